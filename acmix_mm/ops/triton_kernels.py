"""The Triton device code of the 'triton' local-attention kernel (the JIT kernels only).

Host code, availability checks and autograd are in :mod:`acmix_mm.ops.triton_local_attention`,
the only importer of this module, and only where triton is installed: unlike it, this module
imports triton unconditionally. ``triton.jit`` decides at import between the compiler and
Triton's interpreter (``TRITON_INTERPRET``).

Every kernel is one launch; every program handles one (leading index, block of pixels). The
leading dims arrive as two (L0, L1), each operand with its own strides.

- :func:`fwd_kernel`: loads the block's queries once, loops over the kernel**2 offsets
  computing the logit, an online softmax in the compute dtype ``CDT`` (float32, or float64
  for float64 inputs) and the weighted sum of v. It writes the output and the softmax's
  log-sum-exp (L, H_out * W_out), never the (L, kernel**2, H_out, W_out) attention weights.
- :func:`bwd_query_kernel`: recomputes the weights offset by offset and accumulates grad q
  and grad q_pos; also writes ``delta = grad_out . out`` (the softmax backward's
  ``sum_t attn_t * dattn_t``) for the key side.
- :func:`bwd_key_kernel`: a *gather* (no atomics): every position P of the
  reflection-padded key map finds, for each offset t, the one query that reads it through t
  (if any: ``y = (P_y - t_y * dilation) / stride`` when that is a whole number inside the
  output), and accumulates grad k and grad v at P.
- :func:`fold_kernel`: sums each padded position's gradient into its source pixel (a pixel
  near the border is read through up to several padded positions), in a fixed order.

So the backward is deterministic: the same inputs give bitwise the same gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ['TL_DTYPE', 'fwd_kernel', 'bwd_query_kernel', 'bwd_key_kernel', 'fold_kernel']

# Compute dtype (torch, as the host code picks it) -> the kernels' CDT constexpr.
TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def window_tables(t, y, x, mask_p, stride, dilation, rows_ptr, cols_ptr, cx_ptr, cy_ptr,
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
def query_block(pid, n_pblocks, L1, D, DV, WO, NQ, q_ptr, pos_ptr, scale_ptr,
                sq0, sq1, sqc, sqh, sqw, sp0, sp1, spc, sph, spw,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_P: tl.constexpr,
                CDT: tl.constexpr):
    """A query-side program's share: its leading index (pid_l and its two parts l0, l1), its
    block of output pixels (offsets, mask, y, x), the channel offsets and masks of q and v, and
    its queries (D, BLOCK_P) times the scale and positions (BLOCK_P,) in CDT."""
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
    return pid_l, l0, l1, offs_p, mask_p, y, x, offs_d, mask_qd, offs_dv, mask_vd, q, pos_x, pos_y


@triton.jit
def window_logit(t, y, x, mask_p, mask_qd, stride, dilation, rows_ptr, cols_ptr, cx_ptr, cy_ptr,
                 q, pos_x, pos_y, k_base, skh, skw, KERNEL: tl.constexpr, CDT: tl.constexpr):
    """Offset t of the block's windows: the source row/col and padded coordinates, the keys there
    (D, BLOCK_P) in CDT and the logits (BLOCK_P,): q . k plus the position term."""
    r, c, cxv, cyv = window_tables(t, y, x, mask_p, stride, dilation, rows_ptr, cols_ptr,
                                   cx_ptr, cy_ptr, KERNEL)
    kt = tl.load(k_base + (r * skh + c * skw)[None, :], mask=mask_qd, other=0.0).to(CDT)
    logit = tl.sum(q * kt, axis=0) + pos_x * cxv + pos_y * cyv
    return r, c, cxv, cyv, kt, logit


@triton.jit
def fwd_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, lse_ptr,
               rows_ptr, cols_ptr, cx_ptr, cy_ptr, scale_ptr,
               L1, D, DV, WO, NQ, n_pblocks, stride, dilation,
               sq0, sq1, sqc, sqh, sqw,
               sk0, sk1, skc, skh, skw,
               sv0, sv1, svc, svh, svw,
               sp0, sp1, spc, sph, spw,
               KERNEL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_P: tl.constexpr, CDT: tl.constexpr):
    """out (L, DV, NQ) contiguous, lse (L, NQ) contiguous; one program per (l, pixels)."""
    (pid_l, l0, l1, offs_p, mask_p, y, x, offs_d, mask_qd, offs_dv, mask_vd, q, pos_x,
     pos_y) = query_block(
        tl.program_id(0), n_pblocks, L1, D, DV, WO, NQ, q_ptr, pos_ptr, scale_ptr,
        sq0, sq1, sqc, sqh, sqw, sp0, sp1, spc, sph, spw, BLOCK_D, BLOCK_DV, BLOCK_P, CDT)
    k_base = k_ptr + l0 * sk0 + l1 * sk1 + offs_d[:, None] * skc
    v_base = v_ptr + l0 * sv0 + l1 * sv1 + offs_dv[:, None] * svc

    m = tl.full([BLOCK_P], float('-inf'), CDT)
    denom = tl.zeros([BLOCK_P], CDT)
    acc = tl.zeros([BLOCK_DV, BLOCK_P], CDT)
    for t in range(KERNEL * KERNEL):
        r, c, cxv, cyv, kt, logit = window_logit(
            t, y, x, mask_p, mask_qd, stride, dilation, rows_ptr,
            cols_ptr, cx_ptr, cy_ptr, q, pos_x, pos_y, k_base, skh, skw, KERNEL, CDT)
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
def bwd_query_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, g_ptr, lse_ptr,
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
    (pid_l, l0, l1, offs_p, mask_p, y, x, offs_d, mask_qd, offs_dv, mask_vd, q, pos_x,
     pos_y) = query_block(
        tl.program_id(0), n_pblocks, L1, D, DV, WO, NQ, q_ptr, pos_ptr, scale_ptr,
        sq0, sq1, sqc, sqh, sqw, sp0, sp1, spc, sph, spw, BLOCK_D, BLOCK_DV, BLOCK_P, CDT)
    lin = pid_l.to(tl.int64)
    scale = tl.load(scale_ptr)
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
        r, c, cxv, cyv, kt, logit = window_logit(
            t, y, x, mask_p, mask_qd, stride, dilation, rows_ptr,
            cols_ptr, cx_ptr, cy_ptr, q, pos_x, pos_y, k_base, skh, skw, KERNEL, CDT)
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
def bwd_key_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, g_ptr, lse_ptr, delta_ptr,
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
def fold_kernel(src_ptr, dst_ptr, inv_rows_ptr, inv_cols_ptr, W, HW, WP, NP, n_pblocks,
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
