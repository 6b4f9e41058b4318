"""Fused recursive add-and-normalise: K steps of rSkip+LN in one op, keeping one tensor for the backward pass.

With x the block input, h = F(x) the branch output, λ a scalar and N_k a normalisation with its own affine (w_k, b_k):

    y_0 = h;  y_k = N_k(λ·x + y_{k-1}),  k = 1..K;  output y_K

(Liu et al., "Rethinking Skip Connection with Layer Normalization", COLING 2020.) The eager loop keeps each z_k =
λ·x + y_{k-1} for its backward; this op keeps only x (already kept by the branch's first layer), z_1 = λ·x + h and
the K per-row (mean, rstd) pairs, and recomputes z_2..z_K in the backward pass. Backward, for k = K..1, with
x̂_k = (z_k − mean_k)·rstd_k, ĝ = w_k·dy_k and means taken over a row:

    dz_k = rstd_k·(ĝ − mean(ĝ) − x̂_k·mean(ĝ·x̂_k));  dy_{k-1} = dz_k;  dw_k = Σ dy_k·x̂_k;  db_k = Σ dy_k
    dh = dz_1;  dx = λ·Σ_k dz_k;  dλ = Σ x·Σ_k dz_k

A "row" depends on ``norm_dims``: ``"token"`` is the last dimension (LayerNorm), ``"chw"`` one sample's (C, H, W)
(GroupNorm with one group), ``"c"`` one position's C of an NCHW map (ConvNeXt's LayerNorm2d); the affine is per
feature or per channel. By default the op runs PyTorch's native norm kernels on every device; ``use_triton(True)``
(or ``RSKIP_TRITON=1``) runs Triton kernels (`fused_skip_triton`) for CUDA tensors instead. It is registered as
``torch.ops.rskip.skip_norm`` with a fake implementation, so ``torch.compile`` traces models that use it as one node
(a copy of this file imported under another module name, as a saved model's remote code is, registers its own op,
``rskip::skip_norm_<digest of the module name>``).
Under CUDA autocast the op reads and writes the autocast dtype (bf16/fp16), with its statistics in fp32.
"""

import contextlib
import hashlib
import os
from typing import Optional

import torch
from torch import Tensor, nn

from . import fused_skip_triton as kernels

NORM_DIMS = ("token", "chw", "c")
TRITON_ENV = "RSKIP_TRITON"
# Devices where PyTorch's autocast runs LayerNorm in float32: there the op casts x and h to the autocast dtype
# instead, reading and writing bf16/fp16 and keeping only its statistics in fp32.
_AUTOCAST_CASTS_TO_LOW_PRECISION = ("cuda",)
_fused_enabled = True


def _triton_from_environment() -> bool:
    value = os.environ.get(TRITON_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{TRITON_ENV}={value!r} is not allowed; set it to 1 (Triton kernels on CUDA) or 0 (default)")
    return value == "1"


# The Triton kernels are opt-in until tests/test_fused_skip_cuda.py has passed on a GPU (README, "The fused op").
_triton_selected = _triton_from_environment()


@contextlib.contextmanager
def _restore(name: str, previous: bool):
    try:
        yield
    finally:
        globals()[name] = previous


def use_fused_skip(enabled: bool = True):
    """Switch the skip modules between the fused op (the default) and the reference loop of norm modules.

    Takes effect at once; used as a context manager it restores the previous setting on exit:
    ``with rskip.use_fused_skip(False): ...``.
    """
    global _fused_enabled
    previous, _fused_enabled = _fused_enabled, bool(enabled)
    return _restore("_fused_enabled", previous)


def fused_skip_enabled() -> bool:
    return _fused_enabled


def use_triton(enabled: bool = True):
    """Run the op's Triton kernels for CUDA tensors (off by default: CUDA tensors take the PyTorch path).

    The environment variable ``RSKIP_TRITON=1`` sets the same at import. Takes effect at once; used as a context
    manager it restores the previous setting on exit. Without triton installed the PyTorch path serves regardless.
    """
    global _triton_selected
    previous, _triton_selected = _triton_selected, bool(enabled)
    return _restore("_triton_selected", previous)


def triton_enabled() -> bool:
    """Whether CUDA tensors run the Triton kernels (selected and importable)."""
    return _triton_selected and kernels.triton is not None


def fused_norm_dims(norm: nn.Module) -> Optional[str]:
    """The ``norm_dims`` of the op that computes ``norm`` exactly, or None where the op does not apply."""
    try:
        from timm.layers import LayerNorm2d
    except ImportError:
        LayerNorm2d = ()
    if isinstance(norm, LayerNorm2d):
        return "c" if norm.elementwise_affine and norm.bias is not None else None
    if isinstance(norm, nn.LayerNorm):
        affine = norm.elementwise_affine and norm.bias is not None
        return "token" if affine and len(norm.normalized_shape) == 1 else None
    if isinstance(norm, nn.GroupNorm):
        return "chw" if norm.num_groups == 1 and norm.affine else None
    return None


# PyTorch path --------------------------------------------------------------------------------------------------------


def _rows_view(t: Tensor, norm_dims: str) -> Tensor:
    """``"c"`` works on NHWC views, so that each position's channels are one row of the token kernels."""
    return t.permute(0, 2, 3, 1) if norm_dims == "c" else t


def _from_rows_view(t: Tensor, norm_dims: str) -> Tensor:
    """The inverse of `_rows_view` as a tensor of its own, not a view: callers apply in-place ops (ReLU) to op outputs."""
    if norm_dims != "c":
        return t
    s = t.stride()
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.permute(0, 3, 1, 2).shape,
                               (s[0], s[3], s[1], s[2]))


def _join(x: Tensor, y: Tensor, scale: Optional[Tensor], fixed_scale: float) -> Tensor:
    """λ·x + y into a new contiguous tensor (row-major in the row view)."""
    out = torch.empty(x.shape, dtype=torch.result_type(x, y), device=x.device)
    if scale is not None:
        return torch.addcmul(y, x, scale, out=out)
    return torch.add(y, x, alpha=fixed_scale, out=out)


def _norm_forward(z: Tensor, weight: Tensor, bias: Tensor, eps: float, norm_dims: str):
    if norm_dims == "chw":
        n, c = z.shape[:2]
        return torch.native_group_norm(z, weight, bias, n, c, z[0, 0].numel(), 1, eps)
    return torch.native_layer_norm(z, z.shape[-1:], weight, bias, eps)


def _norm_backward(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, bias: Tensor, norm_dims: str):
    if norm_dims == "chw":
        n, c = z.shape[:2]
        return torch.ops.aten.native_group_norm_backward(
            dy.contiguous(), z, mean.view(n, 1), rstd.view(n, 1), weight, n, c, z[0, 0].numel(), 1, [True] * 3)
    stat_shape = (*z.shape[:-1], 1)
    return torch.ops.aten.native_layer_norm_backward(
        dy.contiguous(), z, z.shape[-1:], mean.view(stat_shape), rstd.view(stat_shape), weight, bias, [True] * 3)


def _forward_torch(x, h, weight, bias, scale, fixed_scale, eps, norm_dims, needs_grad):
    x, h = _rows_view(x, norm_dims), _rows_view(h, norm_dims)
    z1 = y = _join(x, h, scale, fixed_scale)
    means, rstds = [], []
    for k in range(weight.shape[0]):
        if k:
            y = _join(x, y, scale, fixed_scale)
        y, mean, rstd = _norm_forward(y, weight[k], bias[k], eps, norm_dims)
        means.append(mean.reshape(-1))
        rstds.append(rstd.reshape(-1))
    y = _from_rows_view(y, norm_dims)
    if not needs_grad:
        return y, z1.new_empty(0), z1.new_empty(0, dtype=torch.float32), z1.new_empty(0, dtype=torch.float32)
    return y, z1, torch.stack(means).float(), torch.stack(rstds).float()


def _backward_torch(dy, x, z1, weight, bias, scale, fixed_scale, mean, rstd, eps, norm_dims):
    x, dy = _rows_view(x, norm_dims), _rows_view(dy, norm_dims)
    # the dtype the native kernels gave: the input's on CPU, float32 with mixed input/affine dtypes or on CUDA
    stat_dtype = z1.dtype if z1.device.type == "cpu" and weight.dtype == z1.dtype else torch.float32
    mean, rstd = mean.to(stat_dtype), rstd.to(stat_dtype)
    zs = [z1]  # the forward's z_2..z_K, recomputed by the same kernels, so they are bit-identical
    for k in range(weight.shape[0] - 1):
        zs.append(_join(x, _norm_forward(zs[k], weight[k], bias[k], eps, norm_dims)[0], scale, fixed_scale))
    grad_weight, grad_bias = torch.empty_like(weight), torch.empty_like(bias)
    dz_sum = None
    for k in reversed(range(weight.shape[0])):
        dy, grad_weight[k], grad_bias[k] = _norm_backward(dy, zs[k], mean[k], rstd[k], weight[k], bias[k], norm_dims)
        if k < weight.shape[0] - 1:  # the first sum is a new tensor; dz_K stays the next step's gradient
            dz_sum = dz_sum + dy if k == weight.shape[0] - 2 else dz_sum.add_(dy)
        else:
            dz_sum = dy
    dz_sum = _from_rows_view(dz_sum, norm_dims) if weight.shape[0] > 1 else dy.new_empty(0)
    return _from_rows_view(dy, norm_dims), dz_sum, grad_weight, grad_bias


# Triton path (opt-in on CUDA) ----------------------------------------------------------------------------------------


def _row_geometry(x: Tensor, norm_dims: str) -> tuple[int, int, int]:
    """(rows, features per row, row_div): row r is sample r // row_div at position r % row_div."""
    if norm_dims == "token":
        return x.numel() // x.shape[-1], x.shape[-1], 1
    n, c = x.shape[:2]
    hw = x[0, 0].numel()
    if norm_dims == "chw":
        return n, c * hw, 1
    return n * hw, c, hw


def _row_layout_empty(x: Tensor, norm_dims: str, dtype) -> Tensor:
    """A tensor shaped like ``x`` whose rows are contiguous (NHWC memory for ``"c"``)."""
    if norm_dims == "c":
        return torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=torch.channels_last)
    return x.new_empty(x.shape, dtype=dtype)


def _forward_triton(x, h, weight, bias, scale, fixed_scale, eps, norm_dims, needs_grad):
    dtype = torch.result_type(x, h)
    y = _row_layout_empty(x, norm_dims, dtype)
    z1 = _row_layout_empty(x, norm_dims, dtype) if needs_grad else y  # not written without needs_grad
    mean, rstd = kernels.forward(x, h, weight, bias, scale, fixed_scale, eps, norm_dims, needs_grad, y, z1,
                                 _row_geometry(x, norm_dims))
    if not needs_grad:
        return y, x.new_empty(0, dtype=dtype), mean.new_empty(0), rstd.new_empty(0)
    return y, _rows_view(z1, norm_dims), mean, rstd


def _backward_triton(dy, x, z1, weight, bias, scale, fixed_scale, mean, rstd, eps, norm_dims):
    z1 = z1.permute(0, 3, 1, 2) if norm_dims == "c" else z1  # z_1 is kept as the row view: back to NCHW
    # dy in z_1's layout, so that one set of strides serves dy, z_1, dh and Σ dz
    dy = dy if dy.stride() == z1.stride() else torch.empty_like(z1, dtype=dy.dtype).copy_(dy)
    grad_h = torch.empty_like(z1)
    dz_sum = torch.empty_like(z1) if weight.shape[0] > 1 else z1.new_empty(0)
    grad_weight, grad_bias = kernels.backward(
        dy, x, z1, weight, bias, scale, fixed_scale, mean, rstd, norm_dims, grad_h,
        dz_sum if weight.shape[0] > 1 else grad_h, _row_geometry(x, norm_dims))
    return grad_h, dz_sum, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)


# Tests run the Triton path on CPU tensors under TRITON_INTERPRET=1 by setting this.
_interpret_triton = False


def _use_triton(x: Tensor, h: Tensor, weight: Tensor, norm_dims: str) -> bool:
    return ((x.is_cuda and _triton_selected) or _interpret_triton) and kernels.supports(x, h, weight, norm_dims)


# The op --------------------------------------------------------------------------------------------------------------

# One op per copy of this file. A saved model's remote code is a second copy (transformers_modules.<folder>.fused_skip)
# beside an installed rskip; redefining an op of the same name frees the first copy's op while its models still call it
# (use after free: "vector::reserve" errors or a crash, later and at random).
_OP_SUFFIX = "" if __name__ == "rskip.fused_skip" else "_" + hashlib.sha1(__name__.encode()).hexdigest()[:12]


@torch.library.custom_op(f"rskip::skip_norm{_OP_SUFFIX}", mutates_args=())
def _skip_norm_op(
    x: Tensor, h: Tensor, weight: Tensor, bias: Tensor, scale: Optional[Tensor], fixed_scale: float, eps: float,
    norm_dims: str, needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y_K, z_1, mean, rstd); z_1 and the (K, rows) fp32 statistics are empty when ``needs_grad`` is False."""
    forward = _forward_triton if _use_triton(x, h, weight, norm_dims) else _forward_torch
    return forward(x, h, weight, bias, scale, fixed_scale, eps, norm_dims, needs_grad)


@_skip_norm_op.register_fake
def _(x, h, weight, bias, scale, fixed_scale, eps, norm_dims, needs_grad):
    dtype = torch.result_type(x, h)
    y = _row_layout_empty(x, norm_dims, dtype)
    if not needs_grad:
        return y, x.new_empty(0, dtype=dtype), x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    z1 = torch.empty_like(_rows_view(x, norm_dims), dtype=dtype, memory_format=torch.contiguous_format)
    stats = x.new_empty((weight.shape[0], _row_geometry(x, norm_dims)[0]), dtype=torch.float32)
    return y, z1, stats, torch.empty_like(stats)


@torch.library.custom_op(f"rskip::skip_norm_backward{_OP_SUFFIX}", mutates_args=())
def _skip_norm_backward_op(
    dy: Tensor, x: Tensor, z1: Tensor, weight: Tensor, bias: Tensor, scale: Optional[Tensor], fixed_scale: float,
    mean: Tensor, rstd: Tensor, eps: float, norm_dims: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dh = dz_1, Σ_k dz_k (empty for K = 1, where it is dh), dw, db)."""
    backward = _backward_triton if _use_triton(x, z1, weight, norm_dims) else _backward_torch
    return backward(dy, x, z1, weight, bias, scale, fixed_scale, mean, rstd, eps, norm_dims)


@_skip_norm_backward_op.register_fake
def _(dy, x, z1, weight, bias, scale, fixed_scale, mean, rstd, eps, norm_dims):
    grad_h = _row_layout_empty(x, norm_dims, z1.dtype)
    dz_sum = torch.empty_like(grad_h) if weight.shape[0] > 1 else z1.new_empty(0)
    return grad_h, dz_sum, torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, h, weight, bias, scale, fixed_scale, eps, norm_dims, needs_grad = inputs
    _, z1, mean, rstd = output
    ctx.save_for_backward(x, z1, weight, bias, scale, mean, rstd)
    # z_1 and the statistics are for the backward only: without this, autograd fills a zero gradient for each of them
    # (a full-size memset per call)
    ctx.mark_non_differentiable(z1, mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.fixed_scale, ctx.eps, ctx.norm_dims = fixed_scale, eps, norm_dims
    ctx.h_dtype = h.dtype


def _backward(ctx, dy, _z1, _mean, _rstd):
    if dy is None:  # y_K took no part in the loss
        return (None,) * 9
    x, z1, weight, bias, scale, mean, rstd = ctx.saved_tensors
    grad_h, dz_sum, grad_weight, grad_bias = _skip_norm_backward_op(
        dy, x, z1, weight, bias, scale, ctx.fixed_scale, mean, rstd, ctx.eps, ctx.norm_dims)
    if weight.shape[0] == 1:
        dz_sum = grad_h
    grad_scale = None
    if scale is not None:
        grad_scale = (dz_sum * x).sum().to(scale.dtype)
        grad_x = dz_sum * scale
    else:
        grad_x = dz_sum if ctx.fixed_scale == 1.0 else dz_sum * ctx.fixed_scale
    return (grad_x.to(x.dtype), grad_h.to(ctx.h_dtype), grad_weight, grad_bias, grad_scale,
            None, None, None, None)


_skip_norm_op.register_autograd(_backward, setup_context=_setup_context)


def skip_norm(x: Tensor, h: Tensor, weight: Tensor, bias: Tensor, scale, eps: float, norm_dims: str) -> Tensor:
    """y_K of y_0 = h, y_k = N_k(λ·x + y_{k-1}), k = 1..K, as one op.

    ``weight``/``bias``: (K, C), row k - 1 the affine of N_k; ``scale``: λ, a float or a 0-d tensor (learned);
    ``norm_dims``: ``"token"``, ``"chw"`` or ``"c"`` (see the module docstring).
    """
    if norm_dims not in NORM_DIMS:
        raise ValueError(f"norm_dims={norm_dims!r} is not known; allowed: {', '.join(NORM_DIMS)}")
    learned = isinstance(scale, Tensor)
    device = x.device.type
    if device in _AUTOCAST_CASTS_TO_LOW_PRECISION and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, h = x.to(dtype), h.to(dtype)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, h, weight, bias, *([scale] if learned else [])))
    return _skip_norm_op(x, h, weight, bias, scale if learned else None, 1.0 if learned else float(scale), eps,
                         norm_dims, needs_grad)[0]


__all__ = ["NORM_DIMS", "TRITON_ENV", "fused_norm_dims", "fused_skip_enabled", "skip_norm", "triton_enabled",
           "use_fused_skip", "use_triton"]
