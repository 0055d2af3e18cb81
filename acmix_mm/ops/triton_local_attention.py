"""Triton kernels for ACMix's local attention (forward and backward), for CUDA.

Computes exactly the function of :func:`acmix_mm.ops.local_attention.unfold_local_attention`
(see that module's docstring): with ``...`` any leading dims (in ACMix (batch, head)),

- ``q``: (..., D, H_out, W_out), ``k``: (..., D, H, W), ``v``: (..., Dv, H, W),
- ``q_pos``: (..., 2, H_out, W_out), ``coord_x``: (W,), ``coord_y``: (H,),

    logit_t = scale * q . k[p_t] + q_pos[0] * coord_x[p_t] + q_pos[1] * coord_y[p_t]
    out     = sum_t softmax_t(logit) * v[p_t]                  (..., Dv, H_out, W_out)

where p_t runs over the ``kernel x kernel`` window (dilation ``dilation``) centred on input
position (y * stride, x * stride) of the maps extended by repeated reflection.

Kernels (one launch each; every program handles one (leading index, block of pixels)):

- forward: loads the block's queries once, loops over the kernel**2 offsets computing the
  logit, an online softmax in float32 (float64 for float64 inputs) and the weighted sum of
  v. It saves only the softmax's log-sum-exp (..., H_out * W_out) besides its inputs and
  output, never the (..., kernel**2, H_out, W_out) attention weights.
- backward, query side: recomputes the weights offset by offset and accumulates grad q and
  grad q_pos; also writes ``delta = grad_out . out`` (the softmax backward's
  ``sum_t attn_t * dattn_t``) for the key side.
- backward, key side: a *gather* (no atomics): every position P of the reflection-padded key
  map finds, for each offset t, the one query that reads it through t (if any:
  ``y = (P_y - t_y * dilation) / stride`` when that is a whole number inside the output), and
  accumulates grad k and grad v at P. A fold kernel then sums each padded position into its
  source pixel (a pixel near the border is read through up to several padded positions).
  So the backward is deterministic: the same inputs give bitwise the same gradients.

Reflection padding uses index tables (:func:`acmix_mm.ops.local_attention.reflect_index`),
so any map size works, 1 px included, and any odd kernel, dilation and stride.

Inputs may be float16, bfloat16, float32 (all computed in float32) or float64 (computed in
float64); all of q, k, v, q_pos and the coordinates must share the dtype and the device.
Any strides are accepted for the (up to two trailing) leading dims, channels and pixels, so
ACMix's q / k / v, which are permuted, strided views of one projection, are read in place.

Under ``torch.compile`` the call is a graph break (the kernels run eagerly). Selecting this
implementation for ACMix (``attn_impl``) is :mod:`acmix_mm.ops.local_attention`'s business.

Availability: Triton must be importable, and either CUDA present or Triton's interpreter
enabled (``TRITON_INTERPRET=1`` in the environment *before* this module is first imported;
it then runs the kernels on CPU tensors with numpy, slowly: for tests only).
"""
from __future__ import annotations

import functools
import os
from typing import Tuple

import torch

# The module, not its names: local_attention may import this module at its top (to dispatch
# impl='triton'); attributes are looked up at call time, so the circular import is harmless.
from . import local_attention as _reference

try:  # Triton is optional: only the CUDA fast path needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None


def _interpreting() -> bool:
    """Whether triton.jit makes interpreter kernels now (TRITON_INTERPRET, as Triton reads it)."""
    if triton is None:
        return False
    try:
        from triton import knobs  # Triton >= 3.4
        return bool(knobs.runtime.interpret)
    except ImportError:  # older Triton reads the variable directly
        return os.environ.get('TRITON_INTERPRET', '0').lower() in ('1', 'true', 'on', 'yes')


# Read once: triton.jit decides at decoration (import) time between the compiler and the
# interpreter, so a later change of TRITON_INTERPRET does not affect these kernels.
_INTERPRET = _interpreting()

__all__ = ['triton_available', 'triton_local_attention', 'TRITON_DTYPES']

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_available() -> bool:
    """True if :func:`triton_local_attention` can run here.

    That is: triton is importable and either CUDA is available or the kernels were defined
    under Triton's interpreter (``TRITON_INTERPRET=1`` when this module was imported).
    """
    return triton is not None and (_INTERPRET or torch.cuda.is_available())


if triton is not None:

    @triton.jit
    def _window_tables(t, y, x, mask_p, stride, dilation, rows_ptr, cols_ptr, cx_ptr, cy_ptr,
                       KERNEL: tl.constexpr):
        """Source row/col and padded coordinates of offset t for output pixels (y, x)."""
        ty = t // KERNEL
        tx = t % KERNEL
        pr = y * stride + ty * dilation  # row in the padded map (< H + 2 * pad by construction)
        pc = x * stride + tx * dilation
        r = tl.load(rows_ptr + pr, mask=mask_p, other=0)
        c = tl.load(cols_ptr + pc, mask=mask_p, other=0)
        cxv = tl.load(cx_ptr + pc, mask=mask_p, other=0.0)
        cyv = tl.load(cy_ptr + pr, mask=mask_p, other=0.0)
        return r, c, cxv, cyv

    @triton.jit
    def _fwd_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, lse_ptr,
                    rows_ptr, cols_ptr, cx_ptr, cy_ptr, scale_ptr,
                    L1, D, DV, WO, NQ, n_pblocks, stride, dilation,
                    sq0, sq1, sqc, sqh, sqw,
                    sk0, sk1, skc, skh, skw,
                    sv0, sv1, svc, svh, svw,
                    sp0, sp1, spc, sph, spw,
                    KERNEL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_P: tl.constexpr, CDT: tl.constexpr):
        """out (L, DV, NQ) contiguous, lse (L, NQ) contiguous; one program per (l, pixels)."""
        pid = tl.program_id(0)
        pid_l = pid // n_pblocks
        pid_p = pid % n_pblocks
        l0 = (pid_l // L1).to(tl.int64)  # int64: batch offsets can exceed 2**31 elements
        l1 = (pid_l % L1).to(tl.int64)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < NQ
        y = offs_p // WO
        x = offs_p % WO
        offs_d = tl.arange(0, BLOCK_D)
        mask_qd = (offs_d < D)[:, None] & mask_p[None, :]
        offs_dv = tl.arange(0, BLOCK_DV)
        mask_vd = (offs_dv < DV)[:, None] & mask_p[None, :]
        scale = tl.load(scale_ptr)

        q = tl.load(q_ptr + l0 * sq0 + l1 * sq1 + offs_d[:, None] * sqc
                    + (y * sqh + x * sqw)[None, :], mask=mask_qd, other=0.0).to(CDT) * scale
        pos_base = pos_ptr + l0 * sp0 + l1 * sp1 + y * sph + x * spw
        pos_x = tl.load(pos_base, mask=mask_p, other=0.0).to(CDT)
        pos_y = tl.load(pos_base + spc, mask=mask_p, other=0.0).to(CDT)
        k_base = k_ptr + l0 * sk0 + l1 * sk1 + offs_d[:, None] * skc
        v_base = v_ptr + l0 * sv0 + l1 * sv1 + offs_dv[:, None] * svc

        m = tl.full([BLOCK_P], float('-inf'), CDT)
        denom = tl.zeros([BLOCK_P], CDT)
        acc = tl.zeros([BLOCK_DV, BLOCK_P], CDT)
        for t in range(KERNEL * KERNEL):
            r, c, cxv, cyv = _window_tables(t, y, x, mask_p, stride, dilation, rows_ptr,
                                            cols_ptr, cx_ptr, cy_ptr, KERNEL)
            kt = tl.load(k_base + (r * skh + c * skw)[None, :], mask=mask_qd, other=0.0)
            logit = tl.sum(q * kt.to(CDT), axis=0) + pos_x * cxv + pos_y * cyv
            # Online softmax: rescale what was accumulated under the old running max.
            m_new = tl.maximum(m, logit)
            alpha = tl.exp(m - m_new)
            p = tl.exp(logit - m_new)
            denom = denom * alpha + p
            vt = tl.load(v_base + (r * svh + c * svw)[None, :], mask=mask_vd, other=0.0)
            acc = acc * alpha[None, :] + p[None, :] * vt.to(CDT)
            m = m_new
        out = acc / denom[None, :]
        tl.store(out_ptr + pid_l.to(tl.int64) * DV * NQ + offs_dv[:, None] * NQ
                 + offs_p[None, :], out, mask=mask_vd)
        tl.store(lse_ptr + pid_l.to(tl.int64) * NQ + offs_p, m + tl.log(denom), mask=mask_p)

    @triton.jit
    def _bwd_query_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, g_ptr, lse_ptr,
                          gq_ptr, gpos_ptr, delta_ptr,
                          rows_ptr, cols_ptr, cx_ptr, cy_ptr, scale_ptr,
                          L1, D, DV, WO, NQ, n_pblocks, stride, dilation,
                          sq0, sq1, sqc, sqh, sqw,
                          sk0, sk1, skc, skh, skw,
                          sv0, sv1, svc, svh, svw,
                          sp0, sp1, spc, sph, spw,
                          KERNEL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                          BLOCK_P: tl.constexpr, CDT: tl.constexpr):
        """grad q (L, D, NQ), grad q_pos (L, 2, NQ) and delta (L, NQ), all contiguous.

        out and g (the output's gradient) are contiguous (L, DV, NQ).
        """
        pid = tl.program_id(0)
        pid_l = pid // n_pblocks
        pid_p = pid % n_pblocks
        l0 = (pid_l // L1).to(tl.int64)
        l1 = (pid_l % L1).to(tl.int64)
        lin = pid_l.to(tl.int64)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < NQ
        y = offs_p // WO
        x = offs_p % WO
        offs_d = tl.arange(0, BLOCK_D)
        mask_qd = (offs_d < D)[:, None] & mask_p[None, :]
        offs_dv = tl.arange(0, BLOCK_DV)
        mask_vd = (offs_dv < DV)[:, None] & mask_p[None, :]
        scale = tl.load(scale_ptr)

        q = tl.load(q_ptr + l0 * sq0 + l1 * sq1 + offs_d[:, None] * sqc
                    + (y * sqh + x * sqw)[None, :], mask=mask_qd, other=0.0).to(CDT) * scale
        pos_base = pos_ptr + l0 * sp0 + l1 * sp1 + y * sph + x * spw
        pos_x = tl.load(pos_base, mask=mask_p, other=0.0).to(CDT)
        pos_y = tl.load(pos_base + spc, mask=mask_p, other=0.0).to(CDT)
        dv_offs = lin * DV * NQ + offs_dv[:, None] * NQ + offs_p[None, :]
        g = tl.load(g_ptr + dv_offs, mask=mask_vd, other=0.0).to(CDT)
        out = tl.load(out_ptr + dv_offs, mask=mask_vd, other=0.0).to(CDT)
        lse = tl.load(lse_ptr + lin * NQ + offs_p, mask=mask_p, other=0.0)
        # sum_t attn_t * (g . v_t) = g . out: the softmax backward's subtracted mean.
        delta = tl.sum(g * out, axis=0)
        k_base = k_ptr + l0 * sk0 + l1 * sk1 + offs_d[:, None] * skc
        v_base = v_ptr + l0 * sv0 + l1 * sv1 + offs_dv[:, None] * svc

        gq = tl.zeros([BLOCK_D, BLOCK_P], CDT)
        gpx = tl.zeros([BLOCK_P], CDT)
        gpy = tl.zeros([BLOCK_P], CDT)
        for t in range(KERNEL * KERNEL):
            r, c, cxv, cyv = _window_tables(t, y, x, mask_p, stride, dilation, rows_ptr,
                                            cols_ptr, cx_ptr, cy_ptr, KERNEL)
            kt = tl.load(k_base + (r * skh + c * skw)[None, :], mask=mask_qd, other=0.0).to(CDT)
            logit = tl.sum(q * kt, axis=0) + pos_x * cxv + pos_y * cyv
            attn = tl.exp(logit - lse)
            vt = tl.load(v_base + (r * svh + c * svw)[None, :], mask=mask_vd, other=0.0)
            ds = attn * (tl.sum(g * vt.to(CDT), axis=0) - delta)  # d loss / d logit_t
            gq += ds[None, :] * kt
            gpx += ds * cxv
            gpy += ds * cyv
        tl.store(gq_ptr + lin * D * NQ + offs_d[:, None] * NQ + offs_p[None, :], gq * scale,
                 mask=mask_qd)
        tl.store(gpos_ptr + lin * 2 * NQ + offs_p, gpx, mask=mask_p)
        tl.store(gpos_ptr + lin * 2 * NQ + NQ + offs_p, gpy, mask=mask_p)
        tl.store(delta_ptr + lin * NQ + offs_p, delta, mask=mask_p)

    @triton.jit
    def _bwd_key_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, g_ptr, lse_ptr, delta_ptr,
                        gk_ptr, gv_ptr,
                        rows_ptr, cols_ptr, cx_ptr, cy_ptr, scale_ptr,
                        L1, D, DV, HO, WO, WP, NP, n_pblocks, stride, dilation,
                        sq0, sq1, sqc, sqh, sqw,
                        sk0, sk1, skc, skh, skw,
                        sv0, sv1, svc, svh, svw,
                        sp0, sp1, spc, sph, spw,
                        KERNEL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                        BLOCK_P: tl.constexpr, CDT: tl.constexpr):
        """grad k and grad v on the padded map: (L, D, NP) and (L, DV, NP), contiguous.

        One program per (l, block of padded key positions); for each offset t, the query that
        reads the key through t is gathered (so nothing is written twice: no atomics).
        """
        pid = tl.program_id(0)
        pid_l = pid // n_pblocks
        pid_p = pid % n_pblocks
        l0 = (pid_l // L1).to(tl.int64)
        l1 = (pid_l % L1).to(tl.int64)
        lin = pid_l.to(tl.int64)
        NQ = HO * WO
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < NP
        py = offs_p // WP  # padded coordinates of the key
        px = offs_p % WP
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        offs_dv = tl.arange(0, BLOCK_DV)
        dvmask = offs_dv < DV
        scale = tl.load(scale_ptr)

        r = tl.load(rows_ptr + py, mask=mask_p, other=0)
        c = tl.load(cols_ptr + px, mask=mask_p, other=0)
        cxv = tl.load(cx_ptr + px, mask=mask_p, other=0.0)
        cyv = tl.load(cy_ptr + py, mask=mask_p, other=0.0)
        kt = tl.load(k_ptr + l0 * sk0 + l1 * sk1 + offs_d[:, None] * skc
                     + (r * skh + c * skw)[None, :],
                     mask=dmask[:, None] & mask_p[None, :], other=0.0).to(CDT)
        vt = tl.load(v_ptr + l0 * sv0 + l1 * sv1 + offs_dv[:, None] * svc
                     + (r * svh + c * svw)[None, :],
                     mask=dvmask[:, None] & mask_p[None, :], other=0.0).to(CDT)
        q_base = q_ptr + l0 * sq0 + l1 * sq1 + offs_d[:, None] * sqc
        pos_base = pos_ptr + l0 * sp0 + l1 * sp1
        g_base = g_ptr + lin * DV * NQ + offs_dv[:, None] * NQ

        gk = tl.zeros([BLOCK_D, BLOCK_P], CDT)
        gv = tl.zeros([BLOCK_DV, BLOCK_P], CDT)
        for t in range(KERNEL * KERNEL):
            ty = t // KERNEL
            tx = t % KERNEL
            qy = py - ty * dilation  # the query's window starts here (times stride)
            qx = px - tx * dilation
            valid = mask_p & (qy >= 0) & (qx >= 0)
            # Clamp before % and // so that C and Python rounding conventions agree.
            qy = tl.where(qy >= 0, qy, 0)
            qx = tl.where(qx >= 0, qx, 0)
            valid = valid & (qy % stride == 0) & (qx % stride == 0)
            yq = qy // stride
            xq = qx // stride
            valid = valid & (yq < HO) & (xq < WO)
            qoff = yq * sqh + xq * sqw
            qi = tl.load(q_base + qoff[None, :], mask=dmask[:, None] & valid[None, :],
                         other=0.0).to(CDT) * scale
            poff = yq * sph + xq * spw
            pos_x = tl.load(pos_base + poff, mask=valid, other=0.0).to(CDT)
            pos_y = tl.load(pos_base + spc + poff, mask=valid, other=0.0).to(CDT)
            nq = yq * WO + xq
            lse = tl.load(lse_ptr + lin * NQ + nq, mask=valid, other=0.0)
            delta = tl.load(delta_ptr + lin * NQ + nq, mask=valid, other=0.0)
            gi = tl.load(g_base + nq[None, :], mask=dvmask[:, None] & valid[None, :],
                         other=0.0).to(CDT)
            logit = tl.sum(qi * kt, axis=0) + pos_x * cxv + pos_y * cyv
            attn = tl.where(valid, tl.exp(logit - lse), 0.0)
            ds = attn * (tl.sum(gi * vt, axis=0) - delta)
            gk += ds[None, :] * qi  # qi already carries the scale
            gv += attn[None, :] * gi
        tl.store(gk_ptr + lin * D * NP + offs_d[:, None] * NP + offs_p[None, :], gk,
                 mask=dmask[:, None] & mask_p[None, :])
        tl.store(gv_ptr + lin * DV * NP + offs_dv[:, None] * NP + offs_p[None, :], gv,
                 mask=dvmask[:, None] & mask_p[None, :])

    @triton.jit
    def _fold_kernel(src_ptr, dst_ptr, inv_rows_ptr, inv_cols_ptr, W, HW, WP, NP, n_pblocks,
                     MAX_R: tl.constexpr, MAX_C: tl.constexpr, BLOCK_P: tl.constexpr,
                     CDT: tl.constexpr):
        """dst (N, H, W) = sum over the padded positions of each pixel of src (N, HP, WP).

        inv_rows (H, MAX_R) / inv_cols (W, MAX_C) list each source row's / col's padded
        rows / cols, -1 where a row has fewer than MAX_R. A fixed summation order: the result
        is deterministic.
        """
        pid = tl.program_id(0)
        n = (pid // n_pblocks).to(tl.int64)
        pid_p = pid % n_pblocks
        offs = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = offs < HW
        r = offs // W
        c = offs % W
        acc = tl.zeros([BLOCK_P], CDT)
        for a in range(MAX_R):
            prow = tl.load(inv_rows_ptr + r * MAX_R + a, mask=mask, other=-1)
            for b in range(MAX_C):
                pcol = tl.load(inv_cols_ptr + c * MAX_C + b, mask=mask, other=-1)
                ok = mask & (prow >= 0) & (pcol >= 0)
                acc += tl.load(src_ptr + n * NP + prow * WP + pcol, mask=ok, other=0.0)
        tl.store(dst_ptr + n * HW + offs, acc, mask=mask)


@functools.lru_cache(maxsize=64)
def _tables(size: int, pad: int, device: str) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Padding table (size + 2 * pad,) int32 and its inverse (size, max_count) int32.

    ``inverse[i, :n_i]`` are the padded positions that read pixel ``i`` (ascending), the rest
    -1; ``max_count`` is the largest ``n_i``. Cached: ACMix calls this with the same few sizes.
    """
    rows = _reference.reflect_index(size, pad)  # on CPU: built once per size
    counts = torch.bincount(rows, minlength=size)
    max_count = int(counts.max())
    order = torch.argsort(rows, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(rows.numel()) - starts[rows[order]]
    inverse = torch.full((size, max_count), -1, dtype=torch.int32)
    inverse[rows[order], rank] = order.to(torch.int32)
    return (rows.to(device=device, dtype=torch.int32), inverse.to(device), max_count)


def _as_5d(x: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) -> (L0, L1, C, H, W): a view where the strides allow it."""
    lead = x.shape[:-3]
    if len(lead) == 0:
        return x[None, None]
    if len(lead) == 1:
        return x[None]
    if len(lead) == 2:
        return x
    return x.reshape(-1, lead[-1], *x.shape[-3:])  # copies only if the leading dims can't merge


def _launch_config(d: int, dv: int, dtype: torch.dtype) -> Tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_DV, BLOCK_P, num_warps) for D / Dv channels.

    Channel tiles are D and Dv padded to powers of two. The pixel tile is sized so that each
    (channels x pixels) tile holds about 16 values per thread: compiled for sm_90, the
    kernels then need 128-250 registers and spill nothing for head_dim 16 to 256 (checked
    with cuobjdump; a larger tile spills in the backward kernels). float64 takes two
    registers a value, hence half the pixels.
    """
    block_d = max(triton.next_power_of_2(d), 2)
    block_dv = max(triton.next_power_of_2(dv), 2)
    widest = max(block_d, block_dv)
    num_warps = 4 if widest <= 32 else 8
    block_p = max(16, min(128, 512 * num_warps // widest))
    if dtype == torch.float64:
        block_p = max(16, block_p // 2)
    if _INTERPRET:  # numpy runs each program in turn: fewer, larger programs are faster
        block_p = 64
    return block_d, block_dv, block_p, num_warps


def _strides(x5: torch.Tensor) -> Tuple[int, ...]:
    return tuple(x5.stride())


class _TritonLocalAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, q_pos (as given), the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride, scale):
        out_shape = (*v.shape[:-3], v.shape[-3], *q.shape[-2:])
        q5, k5, v5, p5 = _as_5d(q), _as_5d(k), _as_5d(v), _as_5d(q_pos)
        l0, l1, d, h_out, w_out = q5.shape
        dv, h, w = v5.shape[-3:]
        pad = dilation * (kernel - 1) // 2
        dev = str(q.device)
        rows, inv_rows, max_r = _tables(h, pad, dev)
        cols, inv_cols, max_c = _tables(w, pad, dev)
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        cx = coord_x.to(cdt)[cols.long()].contiguous()
        cy = coord_y.to(cdt)[rows.long()].contiguous()
        scale_t = torch.full((1,), scale, dtype=cdt, device=q.device)
        n_lead, nq = l0 * l1, h_out * w_out
        out = torch.empty(n_lead, dv, nq, dtype=q.dtype, device=q.device)
        lse = torch.empty(n_lead, nq, dtype=cdt, device=q.device)
        block_d, block_dv, block_p, num_warps = _launch_config(d, dv, cdt)
        n_pblocks = triton.cdiv(nq, block_p)
        # enable_fp_fusion (FMA) given explicitly: Triton 3.10 changes the default to off.
        with _on_device(q.device):
            _fwd_kernel[(n_lead * n_pblocks,)](
                q5, k5, v5, p5, out, lse, rows, cols, cx, cy, scale_t,
                l1, d, dv, w_out, nq, n_pblocks, stride, dilation,
                *_strides(q5), *_strides(k5), *_strides(v5), *_strides(p5),
                KERNEL=kernel, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_P=block_p,
                CDT=_TL_DTYPE[cdt], num_warps=num_warps, enable_fp_fusion=True)
        out = out.view(out_shape)
        ctx.save_for_backward(q, k, v, q_pos, out, lse, rows, cols, cx, cy, scale_t,
                              inv_rows, inv_cols)
        ctx.geometry = (kernel, dilation, stride, max_r, max_c)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels are not differentiable
    def backward(ctx, grad_out):
        (q, k, v, q_pos, out, lse, rows, cols, cx, cy, scale_t, inv_rows,
         inv_cols) = ctx.saved_tensors
        kernel, dilation, stride, max_r, max_c = ctx.geometry
        q5, k5, v5, p5 = _as_5d(q), _as_5d(k), _as_5d(v), _as_5d(q_pos)
        l0, l1, d, h_out, w_out = q5.shape
        dv, h, w = v5.shape[-3:]
        wp = cols.numel()
        n_lead, nq, n_pad = l0 * l1, h_out * w_out, rows.numel() * cols.numel()
        cdt = lse.dtype
        g = grad_out.reshape(n_lead, dv, nq).contiguous()
        out_flat = out.reshape(n_lead, dv, nq)
        block_d, block_dv, block_p, num_warps = _launch_config(d, dv, cdt)
        common = (rows, cols, cx, cy, scale_t)
        strides = (*_strides(q5), *_strides(k5), *_strides(v5), *_strides(p5))
        meta = dict(KERNEL=kernel, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_P=block_p,
                    CDT=_TL_DTYPE[cdt], num_warps=num_warps, enable_fp_fusion=True)
        grad_q = torch.empty(n_lead, d, nq, dtype=q.dtype, device=q.device)
        grad_pos = torch.empty(n_lead, 2, nq, dtype=q_pos.dtype, device=q.device)
        delta = torch.empty(n_lead, nq, dtype=cdt, device=q.device)
        grad_k = grad_v = None
        with _on_device(q.device):
            n_qblocks = triton.cdiv(nq, block_p)
            _bwd_query_kernel[(n_lead * n_qblocks,)](
                q5, k5, v5, p5, out_flat, g, lse, grad_q, grad_pos, delta, *common,
                l1, d, dv, w_out, nq, n_qblocks, stride, dilation, *strides, **meta)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                gk_pad = torch.empty(n_lead, d, n_pad, dtype=cdt, device=q.device)
                gv_pad = torch.empty(n_lead, dv, n_pad, dtype=cdt, device=q.device)
                n_kblocks = triton.cdiv(n_pad, block_p)
                _bwd_key_kernel[(n_lead * n_kblocks,)](
                    q5, k5, v5, p5, g, lse, delta, gk_pad, gv_pad, *common,
                    l1, d, dv, h_out, w_out, wp, n_pad, n_kblocks, stride, dilation,
                    *strides, **meta)
                grad_k = _fold(gk_pad, inv_rows, inv_cols, max_r, max_c, (h, w), wp, k.dtype)
                grad_v = _fold(gv_pad, inv_rows, inv_cols, max_r, max_c, (h, w), wp, v.dtype)
                grad_k, grad_v = grad_k.view(k.shape), grad_v.view(v.shape)
        return (grad_q.view(q.shape), grad_k, grad_v, grad_pos.view(q_pos.shape),
                None, None, None, None, None, None)


def _fold(grad_pad: torch.Tensor, inv_rows: torch.Tensor, inv_cols: torch.Tensor, max_r: int,
          max_c: int, size: Tuple[int, int], wp: int, dtype: torch.dtype) -> torch.Tensor:
    """(L, C, HP * WP) padded-map gradient -> (L, C, H, W) in ``dtype``, deterministically."""
    n = grad_pad.shape[0] * grad_pad.shape[1]
    h, w = size
    dst = torch.empty(*grad_pad.shape[:2], h, w, dtype=dtype, device=grad_pad.device)
    block = 256
    n_pblocks = triton.cdiv(h * w, block)
    _fold_kernel[(n * n_pblocks,)](grad_pad, dst, inv_rows, inv_cols, w, h * w, wp,
                                   grad_pad.shape[-1], n_pblocks, MAX_R=max_r, MAX_C=max_c,
                                   BLOCK_P=block, CDT=_TL_DTYPE[grad_pad.dtype],
                                   enable_fp_fusion=True)
    return dst


def _on_device(device: torch.device):
    """Make ``device`` current for the launch (Triton launches on the current CUDA device)."""
    if device.type == 'cuda':
        return torch.cuda.device(device)
    return _NullContext()


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if triton is not None:
    _TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


def triton_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           q_pos: torch.Tensor, coord_x: torch.Tensor, coord_y: torch.Tensor,
                           kernel: int, dilation: int = 1, stride: int = 1,
                           scale: float = 1.0) -> torch.Tensor:
    """Local attention with Triton kernels: same function and shapes as
    :func:`acmix_mm.ops.local_attention.unfold_local_attention` (see the module docstring).

    Returns (..., Dv, H_out, W_out) in the inputs' dtype. Differentiable in q, k, v and q_pos.
    """
    if triton is None:
        raise RuntimeError('triton_local_attention: triton is not installed (pip install triton); '
                           "use impl='lean' instead")
    _reference._check_operands(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride)
    tensors = {'q': q, 'k': k, 'v': v, 'q_pos': q_pos, 'coord_x': coord_x, 'coord_y': coord_y}
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f'triton_local_attention: dtype must be one of {TRITON_DTYPES}, got '
                         f'{q.dtype}')
    for name, tensor in tensors.items():
        if tensor.dtype != q.dtype:
            raise ValueError(f'triton_local_attention: all operands must share one dtype; q is '
                             f'{q.dtype} but {name} is {tensor.dtype}')
        if tensor.device != q.device:
            raise ValueError(f'triton_local_attention: all operands must be on one device; q is '
                             f'on {q.device} but {name} is on {tensor.device}')
    if q.device.type != 'cuda' and not _INTERPRET:
        raise RuntimeError(f'triton_local_attention: needs CUDA tensors, got device {q.device} '
                           '(or TRITON_INTERPRET=1 set before importing this module, for tests)')
    if q.device.type == 'cuda' and _INTERPRET:
        raise RuntimeError('triton_local_attention: the kernels were defined under '
                           'TRITON_INTERPRET=1, which runs on CPU tensors only; got device '
                           f'{q.device}')
    if q.numel() == 0 or v.numel() == 0:
        raise ValueError(f'triton_local_attention: empty operands q {tuple(q.shape)}, '
                         f'v {tuple(v.shape)}')
    return _apply(q, k, v, q_pos, coord_x, coord_y, int(kernel), int(dilation), int(stride),
                  float(scale))


# Under torch.compile, dynamo would trace into the launches (and, with the interpreter, into
# numpy): a graph break here runs the kernels eagerly, forward and backward, as written.
@torch.compiler.disable
def _apply(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride, scale):
    return _TritonLocalAttention.apply(q, k, v, q_pos, coord_x, coord_y, kernel, dilation,
                                       stride, scale)
