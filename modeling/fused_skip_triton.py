"""Triton kernels of the fused rSkip+LN op (`fused_skip`): y_0 = h, y_k = N_k(λ·x + y_{k-1}), k = 1..K.

Two layouts of work, both deterministic (no atomics: the affine gradients are per-program fp32 partial sums that the
host reduces in a fixed order) and both with fp32 statistics and accumulation whatever the tensors' dtype:

- Rows in registers (``"token"`` and ``"c"`` rows of up to `MAX_REGISTER_FEATURES` features): a program holds a tile
  of one or more whole rows, loads x and h (x, z_1 and dy in the backward) once, runs all K steps on the tile and
  stores the result; mean and variance come from the tile in two passes over registers (no E[z²] − E[z]²). The
  backward programs are persistent (a fixed number, each walking over many tiles), so their dw/db partials stay in
  registers until one store per program.
- Split rows (``"chw"``, one row being a sample's C·H·W values, and longer token rows): a row is cut into tiles of
  (channels × positions) spread over many programs. Each of the K statistics is a two-stage reduction: per-program
  (count, mean, M2) merged tile by tile with Chan's formula, then combined across programs on the host in a fixed
  order. The forward reads x and h K + 1 times, the backward x, z_1 and dy K + 1 times: such rows do not fit on chip.

The kernels recompute z_2..z_K from z_1, x and the saved statistics instead of keeping them (K ≤ `MAX_RECURSIONS`).
"""

from typing import Optional

import torch
from torch import Tensor

try:  # a saved model folder must load where triton is missing; the PyTorch path serves there
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_RECURSIONS = 4  # the kernels keep one (dw, db) accumulator pair per step in registers
MAX_REGISTER_FEATURES = 8192  # longer rows than this spill registers (flash-attention's note); they are split instead
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE_ELEMENTS = 4096  # elements per program tile for short rows and for split rows
_SPLIT_POSITIONS = 1024  # at most this many positions of a channel per split-row tile
# Set by tests: the number of backward programs where there is no GPU to size it (the interpreter).
interpreter_programs = 3

if triton is not None:

    @triton.jit
    def _step(z, x, lam, mean, rstd, w, b):
        """The next step's input λ·x + N(z), the broadcast shapes given by the caller."""
        return lam * x + ((z - mean) * rstd * w + b)

    # Rows in registers ------------------------------------------------------------------------------------------------

    @triton.jit
    def _rows_fwd_kernel(
        X, H, Y, Z1, W, B, MEAN, RSTD, SCALE, fixed_scale, eps,
        rows, features, row_div, x_sn, x_sp, x_sf, h_sn, h_sp, h_sf, y_sn, y_sp, y_sf,
        K: tl.constexpr, LEARNED: tl.constexpr, STORE_STATS: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
    ):
        lam = tl.load(SCALE).to(tl.float32) if LEARNED else fixed_scale
        row = tl.program_id(0) * R + tl.arange(0, R)
        f = tl.arange(0, BLOCK)
        row_ok = row < rows
        f_ok = f < features
        mask = row_ok[:, None] & f_ok[None, :]
        n = (row // row_div).to(tl.int64)
        p = (row % row_div).to(tl.int64)
        fl = f.to(tl.int64)
        x = tl.load(X + (n * x_sn + p * x_sp)[:, None] + (fl * x_sf)[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + (n * h_sn + p * h_sp)[:, None] + (fl * h_sf)[None, :], mask=mask, other=0.0).to(tl.float32)
        y_offsets = (n * y_sn + p * y_sp)[:, None] + (fl * y_sf)[None, :]
        z = lam * x + h
        if STORE_STATS:
            tl.store(Z1 + y_offsets, z.to(Z1.dtype.element_ty), mask=mask)
        y = z
        for k in tl.static_range(K):
            if k > 0:
                z = lam * x + y
            mean = tl.sum(z, axis=1) / features  # masked entries are 0
            centred = tl.where(mask, z - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / features + eps)
            if STORE_STATS:
                tl.store(MEAN + k * rows + row, mean, mask=row_ok)
                tl.store(RSTD + k * rows + row, rstd, mask=row_ok)
            w = tl.load(W + k * features + f, mask=f_ok, other=0.0).to(tl.float32)
            b = tl.load(B + k * features + f, mask=f_ok, other=0.0).to(tl.float32)
            y = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(Y + y_offsets, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rows_bwd_kernel(
        DY, X, Z1, DH, DZ_SUM, W, B, MEAN, RSTD, DW_PART, DB_PART, SCALE, fixed_scale,
        rows, features, row_div, tiles, x_sn, x_sp, x_sf, z_sn, z_sp, z_sf,
        K: tl.constexpr, LEARNED: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Persistent: program `pid` takes tiles pid, pid + programs, ...; its dw/db partials go to row `pid` of
        DW_PART/DB_PART, shaped (programs, K, features). dy, z_1, dh and Σ dz share one layout, x has its own."""
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        lam = tl.load(SCALE).to(tl.float32) if LEARNED else fixed_scale
        f = tl.arange(0, BLOCK)
        f_ok = f < features
        fl = f.to(tl.int64)
        dw0 = tl.zeros([BLOCK], dtype=tl.float32)
        db0 = tl.zeros([BLOCK], dtype=tl.float32)
        dw1 = tl.zeros([BLOCK], dtype=tl.float32)
        db1 = tl.zeros([BLOCK], dtype=tl.float32)
        dw2 = tl.zeros([BLOCK], dtype=tl.float32)
        db2 = tl.zeros([BLOCK], dtype=tl.float32)
        dw3 = tl.zeros([BLOCK], dtype=tl.float32)
        db3 = tl.zeros([BLOCK], dtype=tl.float32)
        for tile in range(pid, tiles, programs):
            row = tile * R + tl.arange(0, R)
            row_ok = row < rows
            mask = row_ok[:, None] & f_ok[None, :]
            n = (row // row_div).to(tl.int64)
            p = (row % row_div).to(tl.int64)
            x = tl.load(X + (n * x_sn + p * x_sp)[:, None] + (fl * x_sf)[None, :], mask=mask, other=0.0)
            x = x.to(tl.float32)
            z_offsets = (n * z_sn + p * z_sp)[:, None] + (fl * z_sf)[None, :]
            z1 = tl.load(Z1 + z_offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + z_offsets, mask=mask, other=0.0).to(tl.float32)
            dz_sum = tl.zeros([R, BLOCK], dtype=tl.float32)
            for kk in tl.static_range(K):
                k = K - 1 - kk
                z = z1  # z_k, recomputed through the earlier steps (K is small: the quadratic cost stays on chip)
                for j in tl.static_range(K):
                    if j < k:
                        z = _step(z, x, lam,
                                  tl.load(MEAN + j * rows + row, mask=row_ok, other=0.0)[:, None],
                                  tl.load(RSTD + j * rows + row, mask=row_ok, other=0.0)[:, None],
                                  tl.load(W + j * features + f, mask=f_ok, other=0.0).to(tl.float32)[None, :],
                                  tl.load(B + j * features + f, mask=f_ok, other=0.0).to(tl.float32)[None, :])
                mean = tl.load(MEAN + k * rows + row, mask=row_ok, other=0.0)
                rstd = tl.load(RSTD + k * rows + row, mask=row_ok, other=0.0)
                xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
                g = dy * tl.load(W + k * features + f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
                c1 = tl.sum(g, axis=1) / features
                c2 = tl.sum(g * xhat, axis=1) / features
                if k == 0:
                    dw0 += tl.sum(dy * xhat, axis=0)
                    db0 += tl.sum(dy, axis=0)
                if k == 1:
                    dw1 += tl.sum(dy * xhat, axis=0)
                    db1 += tl.sum(dy, axis=0)
                if k == 2:
                    dw2 += tl.sum(dy * xhat, axis=0)
                    db2 += tl.sum(dy, axis=0)
                if k == 3:
                    dw3 += tl.sum(dy * xhat, axis=0)
                    db3 += tl.sum(dy, axis=0)
                dy = tl.where(mask, rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None]), 0.0)
                dz_sum += dy
            tl.store(DH + z_offsets, dy.to(DH.dtype.element_ty), mask=mask)
            if K > 1:
                tl.store(DZ_SUM + z_offsets, dz_sum.to(DZ_SUM.dtype.element_ty), mask=mask)
        part = pid * K * features + f
        tl.store(DW_PART + part, dw0, mask=f_ok)
        tl.store(DB_PART + part, db0, mask=f_ok)
        if K > 1:
            tl.store(DW_PART + part + features, dw1, mask=f_ok)
            tl.store(DB_PART + part + features, db1, mask=f_ok)
        if K > 2:
            tl.store(DW_PART + part + 2 * features, dw2, mask=f_ok)
            tl.store(DB_PART + part + 2 * features, db2, mask=f_ok)
        if K > 3:
            tl.store(DW_PART + part + 3 * features, dw3, mask=f_ok)
            tl.store(DB_PART + part + 3 * features, db3, mask=f_ok)

    # Split rows -------------------------------------------------------------------------------------------------------
    # A row (sample n) is C channels × P positions; element (n, c, q) sits at n·s_n + c·s_c + q·s_q. Programs are
    # (sample or sample group, channel group); a tile is CB channels × QB positions.

    @triton.jit
    def _split_chain(z1, x, lam, MEAN, RSTD, W, B, n, samples, c, c_ok, channels, UPTO: tl.constexpr):
        """z_UPTO (0-based) of one tile, recomputed from z_1 = λx + h through the earlier steps."""
        z = z1
        for j in tl.static_range(UPTO):
            z = _step(z, x, lam, tl.load(MEAN + j * samples + n), tl.load(RSTD + j * samples + n),
                      tl.load(W + j * channels + c, mask=c_ok, other=0.0).to(tl.float32)[:, None],
                      tl.load(B + j * channels + c, mask=c_ok, other=0.0).to(tl.float32)[:, None])
        return z

    @triton.jit
    def _split_fwd_kernel(
        X, H, Y, Z1, W, B, MEAN, RSTD, PART_COUNT, PART_MEAN, PART_M2, SCALE, fixed_scale,
        samples, channels, positions, groups, x_sn, x_sc, x_sq, h_sn, h_sc, h_sq, y_sn, y_sc, y_sq,
        STEP: tl.constexpr, K: tl.constexpr, LEARNED: tl.constexpr, STORE_Z1: tl.constexpr,
        CB: tl.constexpr, QB: tl.constexpr,
    ):
        """STEP < K: this program's (count, mean, M2) of z_STEP; STEP == K: write y_K (and z_1)."""
        n = tl.program_id(0)
        group = tl.program_id(1)
        lam = tl.load(SCALE).to(tl.float32) if LEARNED else fixed_scale
        c = group * CB + tl.arange(0, CB)
        c_ok = c < channels
        cl = c.to(tl.int64)
        nl = n.to(tl.int64)
        count = tl.zeros([], dtype=tl.float32)
        mean = tl.zeros([], dtype=tl.float32)
        m2 = tl.zeros([], dtype=tl.float32)
        for q0 in range(0, positions, QB):
            q = q0 + tl.arange(0, QB)
            mask = c_ok[:, None] & (q < positions)[None, :]
            ql = q.to(tl.int64)
            x = tl.load(X + nl * x_sn + (cl * x_sc)[:, None] + (ql * x_sq)[None, :], mask=mask, other=0.0)
            x = x.to(tl.float32)
            h = tl.load(H + nl * h_sn + (cl * h_sc)[:, None] + (ql * h_sq)[None, :], mask=mask, other=0.0)
            z1 = lam * x + h.to(tl.float32)
            if STEP < K:
                z = _split_chain(z1, x, lam, MEAN, RSTD, W, B, n, samples, c, c_ok, channels, STEP)
                tile_count = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
                tile_mean = tl.sum(tl.sum(tl.where(mask, z, 0.0), axis=1), axis=0) / tile_count
                centred = tl.where(mask, z - tile_mean, 0.0)
                tile_m2 = tl.sum(tl.sum(centred * centred, axis=1), axis=0)
                total = count + tile_count  # Chan et al.'s merge of two (count, mean, M2) summaries
                delta = tile_mean - mean
                mean += delta * tile_count / total
                m2 += tile_m2 + delta * delta * count * tile_count / total
                count = total
            else:
                y_offsets = nl * y_sn + (cl * y_sc)[:, None] + (ql * y_sq)[None, :]
                if STORE_Z1:
                    tl.store(Z1 + y_offsets, z1.to(Z1.dtype.element_ty), mask=mask)
                z = _split_chain(z1, x, lam, MEAN, RSTD, W, B, n, samples, c, c_ok, channels, K - 1)
                y = (z - tl.load(MEAN + (K - 1) * samples + n)) * tl.load(RSTD + (K - 1) * samples + n)
                y = (y * tl.load(W + (K - 1) * channels + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
                     + tl.load(B + (K - 1) * channels + c, mask=c_ok, other=0.0).to(tl.float32)[:, None])
                tl.store(Y + y_offsets, y.to(Y.dtype.element_ty), mask=mask)
        if STEP < K:
            part = n * groups + group
            tl.store(PART_COUNT + part, count)
            tl.store(PART_MEAN + part, mean)
            tl.store(PART_M2 + part, m2)

    @triton.jit
    def _split_bwd_kernel(
        DY, X, Z1, DH, DZ_SUM, W, B, MEAN, RSTD, C1, C2, PART1, PART2, DW_PART, DB_PART, SCALE, fixed_scale,
        samples, channels, positions, groups, samples_per_program, x_sn, x_sc, x_sq, z_sn, z_sc, z_sq,
        TARGET: tl.constexpr, K: tl.constexpr, LEARNED: tl.constexpr, CB: tl.constexpr, QB: tl.constexpr,
    ):
        """TARGET ≥ 0: this program's sums of ĝ and ĝ·x̂ at step TARGET, walking dy down from y_K with the
        row means C1 = mean(ĝ), C2 = mean(ĝ·x̂) of the later steps. TARGET == -1: write dh = dz_1 and Σ_k dz_k, and
        the program's per-channel dw/db partials (over its samples) to DW_PART/DB_PART[sample group, k, c]."""
        first = tl.program_id(0) * samples_per_program
        group = tl.program_id(1)
        lam = tl.load(SCALE).to(tl.float32) if LEARNED else fixed_scale
        c = group * CB + tl.arange(0, CB)
        c_ok = c < channels
        cl = c.to(tl.int64)
        sum1 = tl.zeros([], dtype=tl.float32)
        sum2 = tl.zeros([], dtype=tl.float32)
        dw0 = tl.zeros([CB], dtype=tl.float32)
        db0 = tl.zeros([CB], dtype=tl.float32)
        dw1 = tl.zeros([CB], dtype=tl.float32)
        db1 = tl.zeros([CB], dtype=tl.float32)
        dw2 = tl.zeros([CB], dtype=tl.float32)
        db2 = tl.zeros([CB], dtype=tl.float32)
        dw3 = tl.zeros([CB], dtype=tl.float32)
        db3 = tl.zeros([CB], dtype=tl.float32)
        for n in range(first, tl.minimum(first + samples_per_program, samples)):
            nl = first.to(tl.int64) + (n - first)  # 64-bit offsets (n itself is a plain int in the interpreter)
            for q0 in range(0, positions, QB):
                q = q0 + tl.arange(0, QB)
                mask = c_ok[:, None] & (q < positions)[None, :]
                ql = q.to(tl.int64)
                x = tl.load(X + nl * x_sn + (cl * x_sc)[:, None] + (ql * x_sq)[None, :], mask=mask, other=0.0)
                x = x.to(tl.float32)
                z_offsets = nl * z_sn + (cl * z_sc)[:, None] + (ql * z_sq)[None, :]
                z1 = tl.load(Z1 + z_offsets, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + z_offsets, mask=mask, other=0.0).to(tl.float32)
                dz_sum = tl.zeros([CB, QB], dtype=tl.float32)
                for kk in tl.static_range(K):
                    k = K - 1 - kk
                    if k >= TARGET:
                        z = _split_chain(z1, x, lam, MEAN, RSTD, W, B, n, samples, c, c_ok, channels, k)
                        rstd = tl.load(RSTD + k * samples + n)
                        xhat = tl.where(mask, (z - tl.load(MEAN + k * samples + n)) * rstd, 0.0)
                        g = dy * tl.load(W + k * channels + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
                        if k == TARGET:
                            sum1 += tl.sum(tl.sum(g, axis=1), axis=0)
                            sum2 += tl.sum(tl.sum(g * xhat, axis=1), axis=0)
                        else:
                            if TARGET < 0:
                                if k == 0:
                                    dw0 += tl.sum(dy * xhat, axis=1)
                                    db0 += tl.sum(dy, axis=1)
                                if k == 1:
                                    dw1 += tl.sum(dy * xhat, axis=1)
                                    db1 += tl.sum(dy, axis=1)
                                if k == 2:
                                    dw2 += tl.sum(dy * xhat, axis=1)
                                    db2 += tl.sum(dy, axis=1)
                                if k == 3:
                                    dw3 += tl.sum(dy * xhat, axis=1)
                                    db3 += tl.sum(dy, axis=1)
                            dy = tl.where(mask, rstd * (g - tl.load(C1 + k * samples + n)
                                                        - xhat * tl.load(C2 + k * samples + n)), 0.0)
                            dz_sum += dy
                if TARGET < 0:
                    tl.store(DH + z_offsets, dy.to(DH.dtype.element_ty), mask=mask)
                    if K > 1:
                        tl.store(DZ_SUM + z_offsets, dz_sum.to(DZ_SUM.dtype.element_ty), mask=mask)
        if TARGET >= 0:
            part = tl.program_id(0) * groups + group
            tl.store(PART1 + part, sum1)
            tl.store(PART2 + part, sum2)
        else:
            part = tl.program_id(0) * K * channels + c
            tl.store(DW_PART + part, dw0, mask=c_ok)
            tl.store(DB_PART + part, db0, mask=c_ok)
            if K > 1:
                tl.store(DW_PART + part + channels, dw1, mask=c_ok)
                tl.store(DB_PART + part + channels, db1, mask=c_ok)
            if K > 2:
                tl.store(DW_PART + part + 2 * channels, dw2, mask=c_ok)
                tl.store(DB_PART + part + 2 * channels, db2, mask=c_ok)
            if K > 3:
                tl.store(DW_PART + part + 3 * channels, dw3, mask=c_ok)
                tl.store(DB_PART + part + 3 * channels, db3, mask=c_ok)


# Host side -------------------------------------------------------------------------------------------------------------


def supports(x: Tensor, h: Tensor, weight: Tensor, norm_dims: str) -> bool:
    """Whether the kernels serve this call; the others take the PyTorch path, which computes the same."""
    if triton is None or weight.shape[0] > MAX_RECURSIONS or x.dtype not in DTYPES or h.dtype not in DTYPES:
        return False
    if norm_dims == "c":
        return x.shape[1] <= MAX_REGISTER_FEATURES
    return x.numel() > 0


def _power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _programs(device: torch.device) -> int:
    """Persistent backward programs: a few per multiprocessor (flash-attention uses 8)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 4
    return interpreter_programs


def _warps(block_elements: int) -> int:
    return max(1, min(16, block_elements // 256))


def _rows_layout(t: Tensor, norm_dims: str) -> tuple[Tensor, tuple[int, int, int]]:
    """``t`` and its (sample, position, feature) strides, for ``"token"`` and ``"c"``; reshape views where it can
    (outputs are allocated so that it can), copies otherwise."""
    if norm_dims == "c":
        view = t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1])
        return view, view.stride()
    t = t.contiguous()
    return t, (t.shape[-1], 0, 1)


def _split_layout(t: Tensor, norm_dims: str) -> tuple[Tensor, tuple[int, int, int]]:
    """``t`` and its (sample, channel, position) strides: ``"chw"`` maps (contiguous, channels-last, or copied), or
    token rows (one position per channel)."""
    if norm_dims == "token":
        t = t.contiguous()
        return t, (t.shape[-1], 1, 0)
    view = t.reshape(t.shape[0], t.shape[1], -1)
    return view, view.stride()


def _split_geometry(x: Tensor, norm_dims: str) -> tuple[int, int, int]:
    """(samples, channels, positions) of the split layout."""
    if norm_dims == "token":
        return x.numel() // x.shape[-1], x.shape[-1], 1
    return x.shape[0], x.shape[1], x[0, 0].numel()


def _split_tile(positions: int) -> tuple[int, int]:
    qb = min(_power_of_2(positions), _SPLIT_POSITIONS)
    return max(1, _TILE_ELEMENTS // qb), qb


def uses_registers(x: Tensor, norm_dims: str) -> bool:
    return norm_dims == "c" or (norm_dims == "token" and x.shape[-1] <= MAX_REGISTER_FEATURES)


def forward(x, h, weight, bias, scale: Optional[Tensor], fixed_scale, eps, norm_dims, needs_grad, y, z1,
            row_geometry):
    """Fill ``y`` (and ``z1``) and return the (K, rows) fp32 mean and rstd. ``y``/``z1`` are allocated by the caller
    in the layout the op's fake promises."""
    K = weight.shape[0]
    weight, bias = weight.contiguous(), bias.contiguous()
    scale_arg = scale if scale is not None else weight
    if uses_registers(x, norm_dims):
        rows, features, row_div = row_geometry
        x, xs = _rows_layout(x, norm_dims)
        h, hs = _rows_layout(h, norm_dims)
        _, ys = _rows_layout(y, norm_dims)
        mean = x.new_empty((K, rows), dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block = _power_of_2(features)
        r = max(1, _TILE_ELEMENTS // block)
        _rows_fwd_kernel[(triton.cdiv(rows, r),)](
            x, h, y, z1, weight, bias, mean, rstd, scale_arg, fixed_scale, eps, rows, features, row_div,
            *xs, *hs, *ys, K=K, LEARNED=scale is not None, STORE_STATS=needs_grad, R=r, BLOCK=block,
            num_warps=_warps(r * block))
        return mean, rstd
    samples, channels, positions = _split_geometry(x, norm_dims)
    x, xs = _split_layout(x, norm_dims)
    h, hs = _split_layout(h, norm_dims)
    _, ys = _split_layout(y, norm_dims)
    cb, qb = _split_tile(positions)
    groups = triton.cdiv(channels, cb)
    mean = x.new_empty((K, samples), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    parts = [x.new_empty((samples, groups), dtype=torch.float32) for _ in range(3)]
    for step in range(K + 1):
        _split_fwd_kernel[(samples, groups)](
            x, h, y, z1, weight, bias, mean, rstd, *parts, scale_arg, fixed_scale,
            samples, channels, positions, groups, *xs, *hs, *ys,
            STEP=step, K=K, LEARNED=scale is not None, STORE_Z1=needs_grad, CB=cb, QB=qb,
            num_warps=_warps(cb * qb))
        if step < K:  # Chan's combine of the groups' summaries, in a fixed order
            count, part_mean, part_m2 = parts
            total = count.sum(1)
            mean[step] = (count * part_mean).sum(1) / total
            variance = (part_m2.sum(1) + (count * (part_mean - mean[step, :, None]) ** 2).sum(1)) / total
            rstd[step] = torch.rsqrt(variance + eps)
    return mean, rstd


def backward(dy, x, z1, weight, bias, scale: Optional[Tensor], fixed_scale, mean, rstd, norm_dims, grad_h, dz_sum,
             row_geometry):
    """Fill ``grad_h`` (dz_1) and ``dz_sum`` (Σ_k dz_k, K > 1) and return (dw, db) in fp32. ``dy``, ``z1``,
    ``grad_h`` and ``dz_sum`` share one layout."""
    K = weight.shape[0]
    weight, bias = weight.contiguous(), bias.contiguous()
    scale_arg = scale if scale is not None else weight
    if uses_registers(x, norm_dims):
        rows, features, row_div = row_geometry
        x, xs = _rows_layout(x, norm_dims)
        _, zs = _rows_layout(z1, norm_dims)
        block = _power_of_2(features)
        r = max(1, _TILE_ELEMENTS // block)
        tiles = triton.cdiv(rows, r)
        programs = min(tiles, _programs(x.device))
        dw_part = x.new_empty((programs, K, features), dtype=torch.float32)
        db_part = torch.empty_like(dw_part)
        _rows_bwd_kernel[(programs,)](
            dy, x, z1, grad_h, dz_sum, weight, bias, mean, rstd, dw_part, db_part, scale_arg, fixed_scale,
            rows, features, row_div, tiles, *xs, *zs, K=K, LEARNED=scale is not None, R=r, BLOCK=block,
            num_warps=_warps(r * block))
        return dw_part.sum(0), db_part.sum(0)
    samples, channels, positions = _split_geometry(x, norm_dims)
    x, xs = _split_layout(x, norm_dims)
    _, zs = _split_layout(z1, norm_dims)
    cb, qb = _split_tile(positions)
    groups = triton.cdiv(channels, cb)
    c1 = x.new_zeros((K, samples), dtype=torch.float32)
    c2 = torch.zeros_like(c1)
    part1 = x.new_empty((samples, groups), dtype=torch.float32)
    part2 = torch.empty_like(part1)
    features = channels * positions
    common = dict(K=K, LEARNED=scale is not None, CB=cb, QB=qb, num_warps=_warps(cb * qb))
    for target in reversed(range(K)):
        _split_bwd_kernel[(samples, groups)](
            dy, x, z1, grad_h, dz_sum, weight, bias, mean, rstd, c1, c2, part1, part2, part1, part2,
            scale_arg, fixed_scale, samples, channels, positions, groups, 1, *xs, *zs, TARGET=target, **common)
        c1[target] = part1.sum(1) / features
        c2[target] = part2.sum(1) / features
    # the writing pass: a few samples per program, so that the (sample groups, K, C) partials stay small
    per_program = triton.cdiv(samples, max(1, _programs(x.device) // groups))
    sample_groups = triton.cdiv(samples, per_program)
    dw_part = x.new_empty((sample_groups, K, channels), dtype=torch.float32)
    db_part = torch.empty_like(dw_part)
    _split_bwd_kernel[(sample_groups, groups)](
        dy, x, z1, grad_h, dz_sum, weight, bias, mean, rstd, c1, c2, part1, part2, dw_part, db_part,
        scale_arg, fixed_scale, samples, channels, positions, groups, per_program, *xs, *zs, TARGET=-1, **common)
    return dw_part.sum(0), db_part.sum(0)
