"""The residual family: every way of joining a block's input x and its branch output F(x).

From F. Liu, X. Ren, Z. Zhang, X. Sun, Y. Zou, "Rethinking Skip Connection with Layer
Normalization in Transformers and ResNets", COLING 2020 (arXiv:2105.07205).

With h = F(x) (after the branch's dropout), N a normalisation layer and λ a scalar:

    plain      y = x + h
    post_ln    y = LN(x + h)
    pre_ln     y = x + F(LN(x))                      (the host adds a final LN per stack)
    xskip      y = λ·x + h
    xskip_ln   y = LN(λ·x + h)                       (λ = 1 is post_ln)
    rskip_ln   y_0 = h;  y_k = LN_k(x + y_{k-1}), k = 1..K;  y = y_K   (K = 1 is post_ln)
    xskip_bn   y = BN(λ·x + h)
    rskip_bn   as rskip_ln with BatchNorm

F is computed once; only the add-and-normalise step repeats. Each step has its own norm unless
``skip_share_norm``; ``skip_learnable_scale`` turns λ into one learned scalar per block.

Hosts call ``skip.branch_input(x)`` to get the branch's input and ``skip(x, h)`` for the block
output. A skip that normalises *is* its first norm (a subclass of the host's norm class), so a
host can put it where its post-add norm used to be and stock checkpoints load by name; further
recursion steps use ``recursion_norms``.
"""

from functools import cache

import torch
from torch import nn

from .fused_skip import fused_norm_dims, fused_skip_enabled, skip_norm, triton_enabled
from .skip_options import RECURSIVE_VARIANTS, SkipOptions

# FX (timm's feature extraction) keeps the op one call: its Python wrapper branches on requires_grad.
torch.fx.wrap("skip_norm")


class ResidualSkip(nn.Module):
    """``plain``: y = x + h. The base of the family, and its interface."""

    def branch_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x + h


class ScaledSkip(ResidualSkip):
    """``xskip``: y = λ·x + h, with no normalisation."""

    def __init__(self, scale: float, learnable_scale: bool = False):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale))) if learnable_scale else float(scale)
        self.initial_scale = float(scale)

    def forward(self, x, h):
        return self.scale * x + h


class NormSkip(ResidualSkip):
    """``post_ln``, ``xskip_ln``/``xskip_bn`` and ``rskip_ln``/``rskip_bn``: y_0 = h, y_k = N_k(λ·x + y_{k-1}).

    Mixed into the host's norm class by `create_skip`; the module itself is N_1. Where the norm is a LayerNorm
    (tokens, or feature maps over (C, H, W) or C) the K steps run as one fused op (`rskip.fused_skip`), which keeps
    one tensor for the backward pass whatever K is; `reference_forward` is the loop over the norm modules, used for
    BatchNorm, under ``rskip.use_fused_skip(False)``, and for inference without gradients on CPU.
    """

    norm_layer: type[nn.Module]

    def __init__(self, num_features: int, recursions: int = 1, scale: float = 1.0, share_norm: bool = False,
                 learnable_scale: bool = False):
        self.norm_layer.__init__(self, num_features)
        self.recursions = recursions
        self.share_norm = share_norm
        self.recursion_norms = nn.ModuleList(
            [] if share_norm else [self.norm_layer(num_features) for _ in range(recursions - 1)]
        )
        self.scale = nn.Parameter(torch.tensor(float(scale))) if learnable_scale else float(scale)
        self.initial_scale = float(scale)
        # A fixed λ = 1 (post_ln, rskip_*) is left out rather than multiplied in, so LN(x + h) costs what it costs.
        self.scales_shortcut = learnable_scale or scale != 1.0
        self.fused_norm_dims = fused_norm_dims(self)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return self.norm_layer.forward(self, z)

    def forward(self, x, h):
        if self.fused_norm_dims is None or not fused_skip_enabled():
            return self.reference_forward(x, h)
        if not torch.is_grad_enabled() and not isinstance(x, torch.fx.Proxy) and x.device.type == "cpu":
            # Inference on CPU: the op would save nothing here and runs the same kernels; the loop skips its overhead.
            return self.reference_forward(x, h)
        if self.recursions == 1 and not triton_enabled():
            # One step is the norm of λ·x + h: the op would run the same kernels and keep the same tensor.
            return self.reference_forward(x, h)
        norms = [self] * self.recursions if self.share_norm else [self, *self.recursion_norms]
        weight = torch.stack([norm.weight for norm in norms])
        bias = torch.stack([norm.bias for norm in norms])
        return skip_norm(x, h, weight, bias, self.scale, self.eps, self.fused_norm_dims)

    def reference_forward(self, x, h):
        shortcut = self.scale * x if self.scales_shortcut else x
        y = self.normalize(shortcut + h)
        for step in range(1, self.recursions):
            norm = self.normalize if self.share_norm else self.recursion_norms[step - 1]
            y = norm(shortcut + y)
        return y


class PreNormSkip(ResidualSkip):
    """``pre_ln``: y = x + F(N(x)). Mixed into the host's norm class by `create_skip`."""

    norm_layer: type[nn.Module]

    def __init__(self, num_features: int):
        self.norm_layer.__init__(self, num_features)

    def branch_input(self, x):
        return self.norm_layer.forward(self, x)


@cache
def _on_norm(skip_class: type, norm_layer: type[nn.Module]) -> type:
    """`skip_class` as a subclass of `norm_layer`, so its first norm keeps the norm's parameter names."""
    return type(f"{skip_class.__name__}{norm_layer.__name__}", (skip_class, norm_layer),
                {"norm_layer": norm_layer, "__module__": __name__})


def create_skip(options: SkipOptions, num_features: int, ln_layer: type[nn.Module] = nn.LayerNorm,
                bn_layer: type[nn.Module] = nn.BatchNorm1d) -> ResidualSkip:
    """Build the skip module for one residual block.

    ``ln_layer``/``bn_layer`` are norm classes taking ``num_features`` as their only argument;
    the host picks them for its tensor layout (token features, feature maps, ...).
    """
    variant = options.skip_variant
    if variant == "plain":
        return ResidualSkip()
    if variant == "xskip":
        return ScaledSkip(options.skip_scale, options.skip_learnable_scale)
    norm_layer = bn_layer if variant.endswith("_bn") else ln_layer
    if variant == "pre_ln":
        return _on_norm(PreNormSkip, norm_layer)(num_features)
    recursive = variant in RECURSIVE_VARIANTS
    return _on_norm(NormSkip, norm_layer)(
        num_features,
        recursions=options.skip_recursions if recursive else 1,
        scale=options.skip_scale,
        share_norm=options.skip_share_norm,
        learnable_scale=options.skip_learnable_scale,
    )


__all__ = [
    "ResidualSkip",
    "ScaledSkip",
    "NormSkip",
    "PreNormSkip",
    "create_skip",
]
