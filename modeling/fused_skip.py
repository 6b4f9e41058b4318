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
feature or per channel. On CUDA the op runs a Triton kernel, elsewhere (or without triton) PyTorch's native norm
kernels. It is registered as ``torch.ops.rskip.skip_norm`` with a fake implementation, so ``torch.compile`` traces
models that use it as one node.
"""

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

try:  # a saved model folder must load where triton is missing; the PyTorch path serves there
    import triton
    import triton.language as tl
except ImportError:
    triton = None

NORM_DIMS = ("token", "chw", "c")
_fused_enabled = True


@contextlib.contextmanager
def _restore(previous: bool):
    global _fused_enabled
    try:
        yield
    finally:
        _fused_enabled = previous


def use_fused_skip(enabled: bool = True):
    """Switch the skip modules between the fused op (the default) and the reference loop of norm modules.

    Takes effect at once; used as a context manager it restores the previous setting on exit:
    ``with rskip.use_fused_skip(False): ...``.
    """
    global _fused_enabled
    previous, _fused_enabled = _fused_enabled, bool(enabled)
    return _restore(previous)


def fused_skip_enabled() -> bool:
    return _fused_enabled


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


# Triton path (CUDA) --------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _pick(values, index, KP: tl.constexpr):
        return tl.sum(tl.where(tl.arange(0, KP) == index, values, 0.0), axis=0)

    @triton.jit
    def _put(values, index, value, KP: tl.constexpr):
        return tl.where(tl.arange(0, KP) == index, value, values)

    @triton.jit
    def _skip_norm_fwd_kernel(
        X, H, Y, Z1, W, B, MEAN, RSTD, SCALE, fixed_scale, eps,
        rows, features, row_div, chan_div, channels,
        x_sn, x_sp, x_sf, h_sn, h_sp, h_sf, y_sn, y_sp, y_sf,
        K: tl.constexpr, KP: tl.constexpr, LEARNED: tl.constexpr, STORE_STATS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program per row: K statistics passes (each recomputing z_k from x, h and the earlier statistics),
        then one pass that writes y_K (and z_1 when the backward needs it). Statistics in fp32."""
        row = tl.program_id(0)
        n, p = row // row_div, row % row_div
        lam = tl.load(SCALE).to(tl.float32) if LEARNED else fixed_scale
        means = tl.zeros([KP], dtype=tl.float32)
        rstds = tl.zeros([KP], dtype=tl.float32)
        for k in tl.static_range(K + 1):
            total = tl.zeros([BLOCK], dtype=tl.float32)
            squares = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, features, BLOCK):
                f = start + tl.arange(0, BLOCK)
                mask = f < features
                c = f // chan_div
                x = tl.load(X + n * x_sn + p * x_sp + f * x_sf, mask=mask, other=0.0).to(tl.float32)
                z = lam * x + tl.load(H + n * h_sn + p * h_sp + f * h_sf, mask=mask, other=0.0).to(tl.float32)
                if k == K and STORE_STATS:
                    tl.store(Z1 + n * y_sn + p * y_sp + f * y_sf, z.to(Z1.dtype.element_ty), mask=mask)
                for j in tl.static_range(K):
                    if j < k:
                        w = tl.load(W + j * channels + c, mask=mask, other=0.0).to(tl.float32)
                        b = tl.load(B + j * channels + c, mask=mask, other=0.0).to(tl.float32)
                        z = (z - _pick(means, j, KP)) * _pick(rstds, j, KP) * w + b
                        if j < K - 1:
                            z = lam * x + z
                if k == K:
                    tl.store(Y + n * y_sn + p * y_sp + f * y_sf, z.to(Y.dtype.element_ty), mask=mask)
                else:
                    total += tl.where(mask, z, 0.0)
                    squares += tl.where(mask, z * z, 0.0)
            if k < K:
                mean_k = tl.sum(total, axis=0) / features
                var = tl.maximum(tl.sum(squares, axis=0) / features - mean_k * mean_k, 0.0)
                rstd_k = 1.0 / tl.sqrt(var + eps)
                means = _put(means, k, mean_k, KP)
                rstds = _put(rstds, k, rstd_k, KP)
                if STORE_STATS:
                    tl.store(MEAN + k * rows + row, mean_k)
                    tl.store(RSTD + k * rows + row, rstd_k)

    @triton.jit
    def _skip_norm_bwd_kernel(
        DY, X, Z1, DH, DZ_SUM, W, B, MEAN, RSTD, DW, DB, SCALE, fixed_scale,
        rows, features, row_div, chan_div, channels,
        x_sn, x_sp, x_sf, z_sn, z_sp, z_sf,
        K: tl.constexpr, KP: tl.constexpr, LEARNED: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program per row. Pass t (t = K..1) reduces mean(ĝ_t) and mean(ĝ_t·x̂_t), walking the gradient down
        from y_K with the reductions of the earlier passes; a last pass writes dh = dz_1 and Σ_k dz_k (K > 1) and
        adds dw, db atomically. dy, z_1, dh and Σ dz share one layout, x has its own."""
        row = tl.program_id(0)
        n, p = row // row_div, row % row_div
        lam = tl.load(SCALE).to(tl.float32) if LEARNED else fixed_scale
        c1s = tl.zeros([KP], dtype=tl.float32)
        c2s = tl.zeros([KP], dtype=tl.float32)
        for step in tl.static_range(K + 1):
            target = K - 1 - step  # the step whose reductions this pass finds; -1: the writing pass
            sum1 = tl.zeros([BLOCK], dtype=tl.float32)
            sum2 = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, features, BLOCK):
                f = start + tl.arange(0, BLOCK)
                mask = f < features
                c = f // chan_div
                x = tl.load(X + n * x_sn + p * x_sp + f * x_sf, mask=mask, other=0.0).to(tl.float32)
                z1 = tl.load(Z1 + n * z_sn + p * z_sp + f * z_sf, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + n * z_sn + p * z_sp + f * z_sf, mask=mask, other=0.0).to(tl.float32)
                dz_sum = tl.zeros([BLOCK], dtype=tl.float32)
                for kk in tl.static_range(K):
                    k = K - 1 - kk
                    if k >= target:
                        # x̂_k from z_1 through the forward chain (K is small: the quadratic recompute is cheap)
                        z = z1
                        for j in tl.static_range(K):
                            if j < k:
                                wj = tl.load(W + j * channels + c, mask=mask, other=0.0).to(tl.float32)
                                bj = tl.load(B + j * channels + c, mask=mask, other=0.0).to(tl.float32)
                                z = lam * x + (z - tl.load(MEAN + j * rows + row)) * tl.load(RSTD + j * rows + row) * wj + bj
                        rstd_k = tl.load(RSTD + k * rows + row)
                        xhat = (z - tl.load(MEAN + k * rows + row)) * rstd_k
                        g = tl.load(W + k * channels + c, mask=mask, other=0.0).to(tl.float32) * dy
                        if k == target:
                            sum1 += tl.where(mask, g, 0.0)
                            sum2 += tl.where(mask, g * xhat, 0.0)
                        else:
                            if target < 0:
                                tl.atomic_add(DW + k * channels + c, dy * xhat, mask=mask)
                                tl.atomic_add(DB + k * channels + c, dy, mask=mask)
                            dy = rstd_k * (g - _pick(c1s, k, KP) - xhat * _pick(c2s, k, KP))
                            dz_sum += dy
                if target < 0:
                    tl.store(DH + n * z_sn + p * z_sp + f * z_sf, dy.to(DH.dtype.element_ty), mask=mask)
                    if K > 1:
                        tl.store(DZ_SUM + n * z_sn + p * z_sp + f * z_sf, dz_sum.to(DZ_SUM.dtype.element_ty),
                                 mask=mask)
            if target >= 0:
                c1s = _put(c1s, target, tl.sum(sum1, axis=0) / features, KP)
                c2s = _put(c2s, target, tl.sum(sum2, axis=0) / features, KP)


def _layout(t: Tensor, norm_dims: str) -> tuple[Tensor, tuple[int, int, int]]:
    """``t`` (made dense where needed) and its (sample, position, feature) strides for the kernels."""
    if norm_dims == "c":
        s = t.stride()
        if s[2] != t.shape[3] * s[3] or not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
            t = t.contiguous()
            s = t.stride()
        return t, (s[0], s[3], s[1])
    t = t.contiguous()
    return t, (t[0].numel() if norm_dims == "chw" else t.shape[-1], 0, 1)


def _geometry(x: Tensor, norm_dims: str):
    """(rows, features per row, row_div, chan_div, channels): row r is sample r // row_div at position
    r % row_div, and feature f has channel f // chan_div."""
    if norm_dims == "token":
        return x.numel() // x.shape[-1], x.shape[-1], 1, 1, x.shape[-1]
    n, c = x.shape[:2]
    hw = x[0, 0].numel()
    if norm_dims == "chw":
        return n, c * hw, 1, hw, c
    return n * hw, c, hw, 1, c


def _row_layout_empty(x: Tensor, norm_dims: str, dtype) -> Tensor:
    """A tensor shaped like ``x`` whose rows are contiguous (NHWC memory for ``"c"``)."""
    if norm_dims == "c":
        return torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=torch.channels_last)
    return x.new_empty(x.shape, dtype=dtype)


def _block(features: int) -> int:
    return min(triton.next_power_of_2(features), 4096)


def _forward_triton(x, h, weight, bias, scale, fixed_scale, eps, norm_dims, needs_grad):
    rows, features, row_div, chan_div, channels = _geometry(x, norm_dims)
    x, xs = _layout(x, norm_dims)
    h, hs = _layout(h, norm_dims)
    dtype = torch.result_type(x, h)
    y = _row_layout_empty(x, norm_dims, dtype)
    _, ys = _layout(y, norm_dims)
    K = weight.shape[0]
    z1 = _row_layout_empty(x, norm_dims, dtype) if needs_grad else y
    mean = x.new_empty((K, rows), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _skip_norm_fwd_kernel[(rows,)](
        x, h, y, z1, weight.contiguous(), bias.contiguous(), mean, rstd, scale if scale is not None else mean,
        fixed_scale, eps, rows, features, row_div, chan_div, channels, *xs, *hs, *ys,
        K=K, KP=triton.next_power_of_2(K), LEARNED=scale is not None, STORE_STATS=needs_grad,
        BLOCK=_block(features),
    )
    if not needs_grad:
        return y, x.new_empty(0, dtype=dtype), mean.new_empty(0), rstd.new_empty(0)
    return y, _rows_view(z1, norm_dims).contiguous(), mean, rstd


def _backward_triton(dy, x, z1, weight, bias, scale, fixed_scale, mean, rstd, eps, norm_dims):
    rows, features, row_div, chan_div, channels = _geometry(x, norm_dims)
    x, xs = _layout(x, norm_dims)
    z1 = z1.permute(0, 3, 1, 2) if norm_dims == "c" else z1
    _, zs = _layout(z1, norm_dims)
    # dy in z_1's layout, so that one set of strides serves dy, z_1, dh and Σ dz
    dy = dy if dy.stride() == z1.stride() else torch.empty_like(z1, dtype=dy.dtype).copy_(dy)
    K = weight.shape[0]
    grad_h = torch.empty_like(z1)
    dz_sum = torch.empty_like(z1) if K > 1 else z1.new_empty(0)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
    grad_bias = torch.zeros_like(grad_weight)
    _skip_norm_bwd_kernel[(rows,)](
        dy, x, z1, grad_h, dz_sum, weight.contiguous(), bias.contiguous(), mean, rstd, grad_weight, grad_bias,
        scale if scale is not None else mean, fixed_scale, rows, features, row_div, chan_div, channels, *xs, *zs,
        K=K, KP=triton.next_power_of_2(K), LEARNED=scale is not None, BLOCK=_block(features),
    )
    return grad_h, dz_sum, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)


# Tests run the Triton path on CPU tensors under TRITON_INTERPRET=1 by setting this.
_interpret_triton = False


def _use_triton(x: Tensor) -> bool:
    return triton is not None and (x.is_cuda or _interpret_triton)


# The op --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("rskip::skip_norm", mutates_args=())
def _skip_norm_op(
    x: Tensor, h: Tensor, weight: Tensor, bias: Tensor, scale: Optional[Tensor], fixed_scale: float, eps: float,
    norm_dims: str, needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y_K, z_1, mean, rstd); z_1 and the (K, rows) fp32 statistics are empty when ``needs_grad`` is False."""
    forward = _forward_triton if _use_triton(x) else _forward_torch
    return forward(x, h, weight, bias, scale, fixed_scale, eps, norm_dims, needs_grad)


@_skip_norm_op.register_fake
def _(x, h, weight, bias, scale, fixed_scale, eps, norm_dims, needs_grad):
    dtype = torch.result_type(x, h)
    y = _row_layout_empty(x, norm_dims, dtype)
    if not needs_grad:
        return y, x.new_empty(0, dtype=dtype), x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    z1 = torch.empty_like(_rows_view(x, norm_dims), dtype=dtype, memory_format=torch.contiguous_format)
    stats = x.new_empty((weight.shape[0], _geometry(x, norm_dims)[0]), dtype=torch.float32)
    return y, z1, stats, torch.empty_like(stats)


@torch.library.custom_op("rskip::skip_norm_backward", mutates_args=())
def _skip_norm_backward_op(
    dy: Tensor, x: Tensor, z1: Tensor, weight: Tensor, bias: Tensor, scale: Optional[Tensor], fixed_scale: float,
    mean: Tensor, rstd: Tensor, eps: float, norm_dims: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dh = dz_1, Σ_k dz_k (empty for K = 1, where it is dh), dw, db)."""
    backward = _backward_triton if _use_triton(x) else _backward_torch
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
    ctx.fixed_scale, ctx.eps, ctx.norm_dims = fixed_scale, eps, norm_dims
    ctx.h_dtype = h.dtype


def _backward(ctx, dy, _z1, _mean, _rstd):
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
# Under CUDA autocast LayerNorm runs in float32, and so does the op (CPU autocast keeps LayerNorm's input dtype).
torch.library.register_autocast("rskip::skip_norm", "cuda", torch.float32)


def skip_norm(x: Tensor, h: Tensor, weight: Tensor, bias: Tensor, scale, eps: float, norm_dims: str) -> Tensor:
    """y_K of y_0 = h, y_k = N_k(λ·x + y_{k-1}), k = 1..K, as one op.

    ``weight``/``bias``: (K, C), row k - 1 the affine of N_k; ``scale``: λ, a float or a 0-d tensor (learned);
    ``norm_dims``: ``"token"``, ``"chw"`` or ``"c"`` (see the module docstring).
    """
    if norm_dims not in NORM_DIMS:
        raise ValueError(f"norm_dims={norm_dims!r} is not known; allowed: {', '.join(NORM_DIMS)}")
    learned = isinstance(scale, Tensor)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, h, weight, bias, *([scale] if learned else [])))
    return _skip_norm_op(x, h, weight, bias, scale if learned else None, 1.0 if learned else float(scale), eps,
                         norm_dims, needs_grad)[0]


__all__ = ["NORM_DIMS", "fused_norm_dims", "fused_skip_enabled", "skip_norm", "use_fused_skip"]
