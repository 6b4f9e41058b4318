"""timm ResNets whose blocks join shortcut and branch with the residual family of Liu et al.,
"Rethinking Skip Connection with Layer Normalization in Transformers and ResNets" (COLING 2020, arXiv:2105.07205).

A block with shortcut s (the identity, or the block's projection of its input x) and branch output h = F(x) returns
skip(s, h), e.g. rSkip+LN with K = 2: y = LN_2(s + LN_1(s + h)); λ of the `xskip*` variants multiplies s. timm's
post-activation ResNets then apply the block's final activation, so their norm sits after the add and before it.

- `preact_resnet20/56/110/164`: the CIFAR pre-activation ResNets of He et al., "Identity Mappings in Deep Residual
  Networks" (ECCV 2016), built from timm's ResNetV2 parts.
- `rskip_resnet18/34/50/101/152`: timm's `ResNet` with `RSkipBasicBlock`/`RSkipBottleneck` injected.
- `patch_timm_resnet`: converts a timm `ResNet` of `BasicBlock`s or `Bottleneck`s in place, keeping its weights;
  `rskip_timm_resnet` rebuilds such a model from its saved `model_args`.

The `skip_*` keyword arguments of the entrypoints are recorded in the model's timm `model_args`, so `save_for_hf` and
`push_to_hf_hub` folders load back (after `import rskip`) with the same skip connection.
"""

from collections import OrderedDict

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import BatchNormAct2d, ClassifierHead, GroupNorm1, LayerNorm2d, create_conv2d, get_norm_act_layer
from timm.models import (
    build_model_with_cfg,
    create_model,
    generate_default_cfgs,
    is_model,
    model_entrypoint,
    register_model,
)
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.resnetv2 import PreActBasic, PreActBottleneck, ResNetStage, ResNetV2
from torch import nn

from .configuration_rskip_resnet import CIFAR_BACKBONES, IMAGENET_BACKBONES
from .residual import ResidualSkip, create_skip
from .skip_options import ResNetSkipOptions

# What older timm lacks, so that saved folders load with every timm of the tested range (library_versions.py).
try:  # timm >= 1.0.17
    from timm.layers import register_notrace_module
except ImportError:
    from timm.models._features_fx import register_notrace_module

try:  # timm >= 1.0.21
    from timm.layers import calculate_drop_path_rates
except ImportError:
    def calculate_drop_path_rates(drop_path_rate: float, depths, stagewise: bool) -> list[list[float]]:
        """timm's rates for stagewise depths: a linear rise over all blocks, split into stages."""
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu")  # also under a meta-device context
        return [stage.tolist() for stage in rates.split(list(depths))]

try:  # timm >= 1.0.29
    from timm.layers import get_device_dtype
except ImportError:
    def get_device_dtype(module: nn.Module) -> dict:
        """The device and dtype of the module's first parameter, as timm's factory keyword arguments."""
        parameter = next(module.parameters(), None)
        return {} if parameter is None else {"device": parameter.device, "dtype": parameter.dtype}

try:  # timm >= 1.0.31 records the arguments that rebuild a model (`timm.models.get_model_args`); a private module
    from timm.models._input import update_model_args
except ImportError:
    def update_model_args(model: nn.Module, **model_args) -> None:
        """Where timm 1.0.31 keeps them; older timm neither reads nor writes model arguments."""
        model._model_args = dict(getattr(model, "_model_args", {}), **model_args)


def factory_kwargs(device, dtype) -> dict:
    """`device`/`dtype` for timm's layers, only when set: timm < 1.0.21 layers take neither."""
    return {key: value for key, value in (("device", device), ("dtype", dtype)) if value is not None}


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# LN over (C, H, W) with a per-channel affine is GroupNorm with one group; over C alone it is ConvNeXt's LayerNorm2d.
SKIP_NORM_LAYERS = {"chw": GroupNorm1, "c": LayerNorm2d}


def create_block_skip(options: ResNetSkipOptions, in_channels: int, out_channels: int, device=None,
                      dtype=None) -> ResidualSkip:
    """The skip module of a block; `pre_ln` normalises the block's input, the other variants its joined output."""
    num_features = in_channels if options.skip_variant == "pre_ln" else out_channels
    skip = create_skip(options, num_features, ln_layer=SKIP_NORM_LAYERS[options.skip_norm_dims],
                       bn_layer=nn.BatchNorm2d)
    if options.skip_variant.endswith("_bn"):
        # The skip is its own first BatchNorm2d, whose forward branches on the input's rank: an FX leaf.
        register_notrace_module(type(skip))
    return skip.to(device=device, dtype=dtype)


class _SkipJoin:
    """Gives a timm block a `skip` module sized by its first and last convolution; the block's `forward` calls it."""

    last_conv: str

    def __init__(self, *args, skip_options: ResNetSkipOptions = ResNetSkipOptions(), **kwargs):
        super().__init__(*args, **kwargs)
        self.add_skip(skip_options)

    def add_skip(self, skip_options: ResNetSkipOptions) -> None:
        in_channels, out_channels = self.conv1.in_channels, getattr(self, self.last_conv).out_channels
        self.skip = create_block_skip(skip_options, in_channels, out_channels, **get_device_dtype(self))


class RSkipBasicBlock(_SkipJoin, BasicBlock):
    """Identical to timm's `BasicBlock` except the join: act(skip(shortcut, F(skip.branch_input(x))))."""

    last_conv = "conv2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x

        x = self.conv1(self.skip.branch_input(x))
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)

        x = self.conv2(x)
        x = self.bn2(x)

        if self.se is not None:
            x = self.se(x)

        if self.drop_path is not None:
            x = self.drop_path(x)

        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x = self.skip(shortcut, x)
        x = self.act2(x)

        return x


class RSkipBottleneck(_SkipJoin, Bottleneck):
    """Identical to timm's `Bottleneck` except the join: act(skip(shortcut, F(skip.branch_input(x))))."""

    last_conv = "conv3"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x

        x = self.conv1(self.skip.branch_input(x))
        x = self.bn1(x)
        x = self.act1(x)

        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)

        x = self.conv3(x)
        x = self.bn3(x)

        if self.se is not None:
            x = self.se(x)

        if self.drop_path is not None:
            x = self.drop_path(x)

        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x = self.skip(shortcut, x)
        x = self.act3(x)

        return x


class RSkipPreActBasic(_SkipJoin, PreActBasic):
    """Identical to timm's `PreActBasic` except the join: skip(shortcut, F(skip.branch_input(x)))."""

    last_conv = "conv2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(self.skip.branch_input(x))

        # shortcut branch: the projection sees the pre-activated input, as in He et al.
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x_preact)

        # residual branch
        x = self.conv1(x_preact)
        x = self.conv2(self.norm2(x))
        x = self.drop_path(x)
        return self.skip(shortcut, x)


class RSkipPreActBottleneck(_SkipJoin, PreActBottleneck):
    """Identical to timm's `PreActBottleneck` except the join: skip(shortcut, F(skip.branch_input(x)))."""

    last_conv = "conv3"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(self.skip.branch_input(x))

        # shortcut branch: the projection sees the pre-activated input, as in He et al.
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x_preact)

        # residual branch
        x = self.conv1(x_preact)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        x = self.drop_path(x)
        return self.skip(shortcut, x)


_RSKIP_BLOCKS = {BasicBlock: RSkipBasicBlock, Bottleneck: RSkipBottleneck}
# The stages of timm's `ResNet`; a stage removed by `prune_intermediate_layers` is an `nn.Identity` without blocks.
STAGES = ("layer1", "layer2", "layer3", "layer4")
# How a patched timm ResNet without an `rskip_*` entrypoint of its own is recorded.
PATCHED_ARCHITECTURE = "rskip_timm_resnet"


class CifarPreActResNet(ResNetV2):
    """Identical to timm's `ResNetV2` except: a 3×3 stride-1 stem without pooling (32×32 images), three stages
    at widths 16/32/64, and blocks joined by a skip of the residual family.

    He et al. 2016 ("Identity Mappings"): block F = BN→ReLU→conv3×3→BN→ReLU→conv3×3 (bottleneck: 1×1, 3×3, 1×1 at a
    quarter of the output width), no activation after the join, a final BN→ReLU before pooling; a stage's first
    block projects the pre-activated input with a 1×1 convolution when its shape changes.
    """

    def __init__(
            self,
            layers: tuple[int, ...],
            channels: tuple[int, ...] = (16, 32, 64),
            bottleneck: bool = False,
            stem_width: int = 16,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            skip_options: ResNetSkipOptions = ResNetSkipOptions(),
            device=None,
            dtype=None,
    ):
        # ResNetV2.__init__ builds an ImageNet stem; set up the attributes its methods use instead.
        nn.Module.__init__(self)
        dd = factory_kwargs(device, dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        norm_layer = get_norm_act_layer(BatchNormAct2d, act_layer=nn.ReLU)

        self.stem = nn.Sequential(OrderedDict(conv=create_conv2d(in_chans, stem_width, 3, **dd)))
        self.stem_feat_idx = 0
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module="stem.conv")]

        block_fn = RSkipPreActBottleneck if bottleneck else RSkipPreActBasic
        prev_chs, reduction = stem_width, 1
        self.stages = nn.Sequential()
        for stage_idx, (depth, out_chs, block_dpr) in enumerate(
                zip(layers, channels, calculate_drop_path_rates(drop_path_rate, layers, stagewise=True))):
            stride = 1 if stage_idx == 0 else 2
            self.stages.add_module(str(stage_idx), ResNetStage(
                prev_chs,
                out_chs,
                stride=stride,
                dilation=1,
                depth=depth,
                bottle_ratio=0.25 if bottleneck else 1.0,
                block_dpr=block_dpr,
                block_fn=block_fn,
                conv_layer=create_conv2d,
                norm_layer=norm_layer,
                skip_options=skip_options,
                **dd,
            ))
            prev_chs, reduction = out_chs, reduction * stride
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{stage_idx}"))

        self.num_features = prev_chs
        self.norm = norm_layer(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, use_conv=True, **dd,
        )
        self.head_hidden_size = self.num_features  # the head has no hidden layer

        self.init_weights()

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = False) -> None:
        """ResNetV2's initialisation; He et al. do not zero-initialise the last layer of the branch."""
        super().init_weights(zero_init_last=zero_init_last)

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """`ResNetV2.forward_intermediates` for this net's four feature levels (the stem's output, then each stage's);
        written out because timm < 1.0.31 takes the stem's output where the resolution halves, which this stem keeps."""
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates = []
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        last_idx = len(self.stages)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    # ResNetV2 counts five feature levels (stem and four stages), this net has four.

    def prune_intermediate_layers(self, indices=1, **kwargs):
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        return super().prune_intermediate_layers(take_indices, **kwargs)


def _create_preact_resnet(variant: str, pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    skip_options = ResNetSkipOptions.pop_from(kwargs)
    model = build_model_with_cfg(
        CifarPreActResNet, variant, pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
        skip_options=skip_options,
        **kwargs,
    )
    update_model_args(model, **skip_options.to_dict())
    return model


def _create_rskip_resnet(variant: str, pretrained: bool = False, **kwargs) -> ResNet:
    skip_options = ResNetSkipOptions.pop_from(kwargs)
    block_args = dict(kwargs.pop("block_args", None) or {}, skip_options=skip_options)
    model = build_model_with_cfg(ResNet, variant, pretrained, block_args=block_args, **kwargs)
    update_model_args(model, **skip_options.to_dict())
    return model


def patch_timm_resnet(model: ResNet, **skip_options) -> ResNet:
    """Give every block of a timm `ResNet` the skip connection chosen by ``skip_options``; in place, returns the model.

    Weights are kept (`plain` is the unchanged model); new norm weights start at their default (weight 1, bias 0).
    Only timm's `BasicBlock` and `Bottleneck` are converted: every family of `timm.models.resnet` (resnet*, resnet*d,
    seresnet*, ecaresnet*, resnext*, wide_resnet*, resnetblur*, resnetaa*, resnetrs*, ...). Other blocks of a timm
    `ResNet` (skresnet*'s SelectiveKernel, ResNeSt's, Res2Net's) raise `ValueError`, before anything is changed.

    The model is recorded so that `save_for_hf`/`push_to_hf_hub` folders load back with
    `timm.create_model("local-dir:...", pretrained=True)`: resnet18/34/50/101/152 as their `rskip_resnet*`
    counterpart, any other architecture X as `rskip_timm_resnet` with the model argument ``timm_architecture=X``.
    """
    if not isinstance(model, ResNet):
        raise ValueError(f"model must be a timm ResNet (timm.models.ResNet), got {type(model).__name__}")
    options = ResNetSkipOptions(**skip_options)
    blocks = [block for stage in STAGES for block in getattr(model, stage).children()]
    unsupported = sorted({type(block).__name__ for block in blocks if type(block) not in _RSKIP_BLOCKS})
    if unsupported:
        raise ValueError(
            f"model has blocks of type {', '.join(unsupported)}, which patch_timm_resnet cannot convert; allowed: "
            "timm's BasicBlock and Bottleneck (the models of timm.models.resnet, e.g. resnet50d, seresnet18, "
            "ecaresnet26t, resnext50_32x4d, wide_resnet50_2), not the SelectiveKernel (skresnet*), ResNeSt or Res2Net "
            "blocks; a model patched or built by rskip already has its skip connection"
        )
    for block in blocks:
        block.__class__ = _RSKIP_BLOCKS[type(block)]
        block.add_skip(options)
    update_model_args(model, **options.to_dict())
    architecture = getattr(model, "pretrained_cfg", {}).get("architecture")
    if f"rskip_{architecture}" in default_cfgs:
        _record_architecture(model, f"rskip_{architecture}")
    elif architecture:
        _record_architecture(model, PATCHED_ARCHITECTURE)
        update_model_args(model, timm_architecture=architecture)
    return model


def _record_architecture(model: ResNet, architecture: str) -> None:
    """The architecture `save_for_hf` writes to config.json, which `create_model("local-dir:...")` builds."""
    model.pretrained_cfg = model.default_cfg = dict(model.pretrained_cfg, architecture=architecture)


def rskip_architecture(architecture: str) -> str:
    """The name of this module's model for a timm architecture: ours unchanged, `resnet50` → `rskip_resnet50`."""
    for name in (architecture, f"rskip_{architecture}"):
        if name in default_cfgs:
            return name
    stock = [name.removeprefix("rskip_") for name in default_cfgs if name.startswith("rskip_")]
    raise ValueError(
        f"architecture={architecture!r} has no rskip counterpart; allowed: {', '.join(default_cfgs)} "
        f"and the timm ResNets {', '.join(stock)}"
    )


def _cifar_cfg(**kwargs):
    return {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8),
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
        "first_conv": "stem.conv", "classifier": "head.fc", "license": "apache-2.0",
        "paper_ids": "arXiv:1603.05027,arXiv:2105.07205", **kwargs,
    }


def _imagenet_cfg(**kwargs):
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0",
        "paper_ids": "arXiv:1512.03385,arXiv:2105.07205", **kwargs,
    }


# `register_model` reads `default_cfgs` from this module, so it is defined before the entrypoints.
default_cfgs = generate_default_cfgs({
    **{name: _cifar_cfg() for name in CIFAR_BACKBONES},
    **{name: _imagenet_cfg() for name in IMAGENET_BACKBONES},
})


# This file's entrypoints by name: `create_backbone` builds from them, not from timm's registry, which may hold
# another copy's.
_ENTRYPOINTS = {}


def _register(fn):
    """`register_model`, unless another copy of this file registered the name already: rskip's own, or the copy
    transformers puts next to a saved checkpoint and imports as remote code. Each copy builds its models itself."""
    name = fn.__name__
    _ENTRYPOINTS[name] = fn
    if is_model(name) and model_entrypoint(name).__module__.rpartition(".")[2] == __name__.rpartition(".")[2]:
        return fn
    return register_model(fn)


def create_backbone(name: str, **kwargs) -> nn.Module:
    """The model `name` (one of `BACKBONES`) built by this file's own entrypoint."""
    return _ENTRYPOINTS[name](**kwargs)


@_register
def preact_resnet20(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """PreAct-ResNet-20 for CIFAR: 3 basic blocks per stage."""
    model_args = dict(layers=(3, 3, 3))
    return _create_preact_resnet("preact_resnet20", pretrained, **dict(model_args, **kwargs))


@_register
def preact_resnet56(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """PreAct-ResNet-56 for CIFAR: 9 basic blocks per stage."""
    model_args = dict(layers=(9, 9, 9))
    return _create_preact_resnet("preact_resnet56", pretrained, **dict(model_args, **kwargs))


@_register
def preact_resnet110(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """PreAct-ResNet-110 for CIFAR: 18 basic blocks per stage, 1.7M parameters."""
    model_args = dict(layers=(18, 18, 18))
    return _create_preact_resnet("preact_resnet110", pretrained, **dict(model_args, **kwargs))


@_register
def preact_resnet164(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """PreAct-ResNet-164 for CIFAR: 18 bottleneck blocks per stage, 64/128/256 outputs."""
    model_args = dict(layers=(18, 18, 18), channels=(64, 128, 256), bottleneck=True)
    return _create_preact_resnet("preact_resnet164", pretrained, **dict(model_args, **kwargs))


@_register
def rskip_resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    """timm's resnet18 with the skip connection chosen by the `skip_*` arguments."""
    model_args = dict(block=RSkipBasicBlock, layers=(2, 2, 2, 2))
    return _create_rskip_resnet("rskip_resnet18", pretrained, **dict(model_args, **kwargs))


@_register
def rskip_resnet34(pretrained: bool = False, **kwargs) -> ResNet:
    """timm's resnet34 with the skip connection chosen by the `skip_*` arguments."""
    model_args = dict(block=RSkipBasicBlock, layers=(3, 4, 6, 3))
    return _create_rskip_resnet("rskip_resnet34", pretrained, **dict(model_args, **kwargs))


@_register
def rskip_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """timm's resnet50 with the skip connection chosen by the `skip_*` arguments."""
    model_args = dict(block=RSkipBottleneck, layers=(3, 4, 6, 3))
    return _create_rskip_resnet("rskip_resnet50", pretrained, **dict(model_args, **kwargs))


@_register
def rskip_resnet101(pretrained: bool = False, **kwargs) -> ResNet:
    """timm's resnet101 with the skip connection chosen by the `skip_*` arguments."""
    model_args = dict(block=RSkipBottleneck, layers=(3, 4, 23, 3))
    return _create_rskip_resnet("rskip_resnet101", pretrained, **dict(model_args, **kwargs))


@_register
def rskip_resnet152(pretrained: bool = False, **kwargs) -> ResNet:
    """timm's resnet152 with the skip connection chosen by the `skip_*` arguments."""
    model_args = dict(block=RSkipBottleneck, layers=(3, 8, 36, 3))
    return _create_rskip_resnet("rskip_resnet152", pretrained, **dict(model_args, **kwargs))


@_register
def rskip_timm_resnet(pretrained: bool = False, timm_architecture: str | None = None, **kwargs) -> ResNet:
    """The timm ResNet `timm_architecture` (seresnet18, resnext50_32x4d, ...) patched with the skip connection chosen
    by the `skip_*` arguments: how `patch_timm_resnet` records architectures without an `rskip_*` entrypoint, so that
    their saved folders load back (``pretrained=True`` loads such a folder, not the stock weights)."""
    skip_options = ResNetSkipOptions.pop_from(kwargs)
    if not isinstance(timm_architecture, str) or not is_model(timm_architecture):
        raise ValueError(
            f"timm_architecture={timm_architecture!r} is not a timm model; allowed: a model of timm.models.resnet, "
            "e.g. resnet18d, seresnet18, resnext50_32x4d"
        )

    def build(**model_kwargs) -> ResNet:
        return patch_timm_resnet(create_model(timm_architecture, **model_kwargs), **skip_options.to_dict())

    model = build_model_with_cfg(build, timm_architecture, pretrained, **kwargs)
    _record_architecture(model, PATCHED_ARCHITECTURE)  # build_model_with_cfg set the stock architecture's cfg
    return model


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "SKIP_NORM_LAYERS",
    "create_block_skip",
    "create_backbone",
    "RSkipBasicBlock",
    "RSkipBottleneck",
    "RSkipPreActBasic",
    "RSkipPreActBottleneck",
    "CifarPreActResNet",
    "patch_timm_resnet",
    "rskip_architecture",
]
