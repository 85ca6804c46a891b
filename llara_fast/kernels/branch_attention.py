"""Packed causal attention in which a segment may also read one outside key range (DESIGN §3, §4).

The stream holds N tokens in segments s = cu_seqlens[s]:cu_seqlens[s+1]. Segment s has an
outside context ctx_start[s]:ctx_end[s] (empty for most segments): for a branch (PRED) segment,
its example's BOS..TEXT, which sits in the main segment just before it. Query i of segment s
sees every token of its context and its own tokens j <= i:

    out_i = softmax_j(q_i · k_j / sqrt(D)) v_j    over j in ctx(s) ∪ {own j <= i}

That is the PackedBatch's bottom-right-aligned causal rule over k_index = ctx ++ own, read in
place: no K/V gather in forward and no index_add_ in backward.

Forward: one program per (segment, query block, head), FlashAttention-2's online softmax over
the two key ranges; it stores out and the row log-sum-exp (base 2). Backward recomputes the
probabilities from the log-sum-exp:
- dQ: one program per (segment, query block, head), over the same two key ranges; it also
  computes and stores delta = rowsum(dO ∘ out) of its rows (no fp32 copies of dO and out);
- dK, dV: one program per (segment, key block, kv head), summing the kv head's query heads, in
  two launches after dQ: OWN (a segment's own keys, its queries at or after the key) writes; CTX
  (a segment's context keys, all its queries) adds. A token is in at most one segment's context
  (the backend checks), so the CTX programs never write the same rows.
Segments are the grid's first axis (no 65,535 limit); offsets are int32 (checked).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_NEG = tl.constexpr(-1.0e30)  # a finite -inf for running maxima (keeps exp2() free of inf - inf)
_LOG2E = 1.4426950408889634


@triton.jit
def _fwd_range(acc, m_i, l_i, q, K, V, stride_kn, base, lo, hi, end, offs_m, offs_d, d_ok, qk_scale,
               CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """The online softmax over keys base+lo .. base+hi (valid below base+end) of one kv head
    (K, V point at it): the context range (base 0, every key visible) or the segment's own
    keys (base its first token, key n visible to query m when n <= m)."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        kt = tl.load(K + (base + offs_n)[None, :] * stride_kn + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BD, BN)
        vv = tl.load(V + (base + offs_n)[:, None] * stride_kn + offs_d[None, :],
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BN, BD)
        qk = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BM, BN) log2 units
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])  # (BM, BN)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(vv.dtype), vv, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _dq_range(dq, q, do, lse, delta, K, V, stride_kn, base, lo, hi, end, offs_m, m_ok, offs_d, d_ok, qk_scale,
              CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dQ's sum over the same key ranges as _fwd_range, the probabilities recomputed from lse."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        kt = tl.load(K + (base + offs_n)[None, :] * stride_kn + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BD, BN)
        vt = tl.load(V + (base + offs_n)[None, :] * stride_kn + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BD, BN)
        qk = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BM, BN)
        ok = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(ok, tl.exp2(qk - lse[:, None]), 0.0)  # (BM, BN)
        dp = tl.dot(do, vt, input_precision=PRECISION)  # (BM, BN)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU, CTX0, CTX1,
                stride_qn, stride_qh, stride_kn, stride_kh, stride_on, stride_oh, stride_ln,
                D, qk_scale, GROUP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    s, pid_m, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # segments on axis 0: no 65,535 cap
    q0 = tl.load(CU + s)
    L = tl.load(CU + s + 1) - q0
    m_start = pid_m * BLOCK_M
    if m_start < L:
        kvh = h // GROUP
        c0 = tl.load(CTX0 + s)
        c1 = tl.load(CTX1 + s)
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < L
        d_ok = offs_d < D
        q = tl.load(Q + (q0 + offs_m)[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BM, BD)
        m_i = tl.full([BLOCK_M], _NEG, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv = K + kvh * stride_kh, V + kvh * stride_kh
        acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, *kv, stride_kn, 0, c0, c1, c1, offs_m, offs_d, d_ok, qk_scale,
                                   CAUSAL=False, BLOCK_N=BLOCK_N, PRECISION=PRECISION)  # the context: all visible
        acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, *kv, stride_kn, q0, 0, tl.minimum(L, m_start + BLOCK_M), L,
                                   offs_m, offs_d, d_ok, qk_scale, CAUSAL=True, BLOCK_N=BLOCK_N,
                                   PRECISION=PRECISION)  # the segment's own keys: causal
        l_safe = tl.where(m_ok, l_i, 1.0)  # rows past the segment are not stored
        out = acc / l_safe[:, None]
        tl.store(O + (q0 + offs_m)[:, None] * stride_on + h * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        tl.store(LSE + (q0 + offs_m) * stride_ln + h, m_i + tl.log2(l_safe), mask=m_ok)


@triton.jit
def _dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, CU, CTX0, CTX1,
               stride_qn, stride_qh, stride_kn, stride_kh, stride_ln,
               D, qk_scale, sm_scale, GROUP: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    s, pid_m, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # segments on axis 0: no 65,535 cap
    q0 = tl.load(CU + s)
    L = tl.load(CU + s + 1) - q0
    m_start = pid_m * BLOCK_M
    if m_start < L:
        kvh = h // GROUP
        c0 = tl.load(CTX0 + s)
        c1 = tl.load(CTX1 + s)
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < L
        d_ok = offs_d < D
        rows = (q0 + offs_m)[:, None] * stride_qn + h * stride_qh + offs_d[None, :]
        q = tl.load(Q + rows, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BM, BD)
        do = tl.load(DO + rows, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BM, BD)
        o = tl.load(O + rows, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BM, BD)
        lse = tl.load(LSE + (q0 + offs_m) * stride_ln + h, mask=m_ok, other=0.0)  # (BM,)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # (BM,) rowsum(dO ∘ O)
        tl.store(DELTA + (q0 + offs_m) * stride_ln + h, delta, mask=m_ok)  # for the dK/dV launches
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv = K + kvh * stride_kh, V + kvh * stride_kh
        dq = _dq_range(dq, q, do, lse, delta, *kv, stride_kn, 0, c0, c1, c1, offs_m, m_ok, offs_d, d_ok, qk_scale,
                       CAUSAL=False, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
        dq = _dq_range(dq, q, do, lse, delta, *kv, stride_kn, q0, 0, tl.minimum(L, m_start + BLOCK_M), L, offs_m,
                       m_ok, offs_d, d_ok, qk_scale, CAUSAL=True, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
        tl.store(DQ + rows, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, CU, CTX0, CTX1,
                 stride_qn, stride_qh, stride_kn, stride_kh, stride_ln,
                 D, qk_scale, sm_scale, GROUP: tl.constexpr, CTX: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """CTX False: the keys are segment s's own tokens, seen by its queries at or after them (the
    result is written). CTX True: the keys are s's context, seen by all its queries (added)."""
    s, pid_n, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0 = tl.load(CU + s)
    L = tl.load(CU + s + 1) - q0
    if CTX:
        k0 = tl.load(CTX0 + s)
        LK = tl.load(CTX1 + s) - k0
    else:
        k0 = q0
        LK = L
    n_start = pid_n * BLOCK_N
    if n_start < LK:
        offs_n = n_start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < LK
        d_ok = offs_d < D
        kv_rows = (k0 + offs_n)[:, None] * stride_kn + kvh * stride_kh + offs_d[None, :]
        k = tl.load(K + kv_rows, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BN, BD)
        v = tl.load(V + kv_rows, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BN, BD)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        if CTX:
            m_lo = n_start * 0  # every query of the segment
        else:
            m_lo = n_start  # causal: the queries at or after the block's first key
        for g in range(GROUP):
            h = kvh * GROUP + g
            for m0 in range(m_lo, L, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                m_ok = offs_m < L
                q_rows = (q0 + offs_m)[None, :] * stride_qn + h * stride_qh + offs_d[:, None]
                qt = tl.load(Q + q_rows, mask=m_ok[None, :] & d_ok[:, None], other=0.0)  # (BD, BM)
                dot_ = tl.load(DO + q_rows, mask=m_ok[None, :] & d_ok[:, None], other=0.0)  # (BD, BM)
                lse = tl.load(LSE + (q0 + offs_m) * stride_ln + h, mask=m_ok, other=0.0)  # (BM,)
                delta = tl.load(DELTA + (q0 + offs_m) * stride_ln + h, mask=m_ok, other=0.0)  # (BM,)
                kq = tl.dot(k, qt, input_precision=PRECISION) * qk_scale  # (BN, BM) log2 units
                ok = n_ok[:, None] & m_ok[None, :]
                if not CTX:
                    ok = ok & (offs_n[:, None] <= offs_m[None, :])
                pt = tl.where(ok, tl.exp2(kq - lse[None, :]), 0.0)  # (BN, BM)
                dv = tl.dot(pt.to(dot_.dtype), tl.trans(dot_), dv, input_precision=PRECISION)
                dpt = tl.dot(v, dot_, input_precision=PRECISION)  # (BN, BM)
                dst = pt * (dpt - delta[None, :])
                dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
        dk = dk * sm_scale
        out_ok = n_ok[:, None] & d_ok[None, :]
        if CTX:  # these rows already hold their OWN-pass gradient
            dk += tl.load(DK + kv_rows, mask=out_ok, other=0.0).to(tl.float32)
            dv += tl.load(DV + kv_rows, mask=out_ok, other=0.0).to(tl.float32)
        tl.store(DK + kv_rows, dk.to(DK.dtype.element_ty), mask=out_ok)
        tl.store(DV + kv_rows, dv.to(DV.dtype.element_ty), mask=out_ok)


def _empty(shape, device, dtype) -> torch.Tensor:
    """Output allocation; tests swap in a poisoning allocator to catch unwritten elements."""
    return torch.empty(shape, device=device, dtype=dtype)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact IEEE products (no TF32), so fp32 runs match the fp32 reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _blocks(D: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options. Interpreted: the smallest tiles tl.dot takes. On a GPU:
    FlashAttention-2-like tiles for head dims up to 128; fp32 (IEEE products, no tensor cores)
    takes 32 x 32 tiles over 8 warps; dK/dV take 32 queries x 128 keys (Q and dO reused over more
    keys). Checked for sm_90 with Triton 3.6 and 3.7.1: bf16/fp16 under the 227 KB of shared memory,
    register spills at head dim 128 at most 8 bytes; the speed is the GPU suite's to measure."""
    BD = max(16, triton.next_power_of_2(D))
    if _interpreted():
        return dict(fwd=(16, 16, {}), dq=(16, 16, {}), dkdv=(16, 16, {}), BLOCK_D=BD)
    big = BD <= 128 and dtype != torch.float32
    return dict(fwd=(128, 64, dict(num_warps=8, num_stages=3)) if big else (32, 32, dict(num_warps=8, num_stages=1)),
                dq=(64, 64, dict(num_warps=4, num_stages=2)) if big else (32, 32, dict(num_warps=8, num_stages=1)),
                dkdv=(32, 128, dict(num_warps=8, num_stages=2)) if big else (32, 32, dict(num_warps=8, num_stages=1)),
                BLOCK_D=BD)


def _check(q, k, v, cu_seqlens, ctx_start, ctx_end):
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"branch_attention: expected q (N, H, D) and k, v (N, KV, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"branch_attention: {q.shape[1]} query heads do not group over {k.shape[1]} kv heads")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"branch_attention: q, k, v must share a float dtype (fp32/fp16/bf16), got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    N, H, D = q.shape
    if N * max(H, k.shape[1]) * D >= 2**31:  # the kernels' offsets are int32
        raise ValueError(f"branch_attention: {N} tokens x {max(H, k.shape[1])} heads x {D} exceed the kernels' "
                         "int32 offsets; split the batch")
    n_seg = cu_seqlens.shape[0] - 1
    if ctx_start.shape != (n_seg,) or ctx_end.shape != (n_seg,):
        raise ValueError(f"branch_attention: ctx_start and ctx_end must be ({n_seg},), one per segment, got "
                         f"{tuple(ctx_start.shape)} and {tuple(ctx_end.shape)}")


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).contiguous()


def branch_attention_forward(q, k, v, cu, c0, c1, max_seqlen: int):
    """(out (N, H, D), lse (N, H) fp32 in base 2)."""
    N, H, D = q.shape
    out = _empty(q.shape, q.device, q.dtype)  # (N, H, D)
    lse = _empty((N, H), q.device, torch.float32)  # (N, H)
    if N == 0 or cu.shape[0] < 2:
        return out, lse
    cfg = _blocks(D, q.dtype)
    BM, BN, opts = cfg["fwd"]
    scale = 1.0 / math.sqrt(D)
    grid = (cu.shape[0] - 1, triton.cdiv(max_seqlen, BM), H)
    _fwd_kernel[grid](q, k, v, out, lse, cu, c0, c1,
                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1), lse.stride(0),
                      D, scale * _LOG2E, GROUP=H // k.shape[1], BLOCK_M=BM, BLOCK_N=BN,
                      BLOCK_D=cfg["BLOCK_D"], PRECISION=_precision(q.dtype), **opts)
    return out, lse


def branch_attention_backward(do, q, k, v, out, lse, cu, c0, c1, max_seqlen: int, max_ctx: int):
    """(dq, dk, dv) in the inputs' dtype."""
    N, H, D = q.shape
    KV = k.shape[1]
    do = do.contiguous()
    dq, dk, dv = (_empty(t.shape, t.device, t.dtype) for t in (q, k, v))
    if N == 0 or cu.shape[0] < 2:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = _empty((N, H), q.device, torch.float32)  # (N, H) rowsum(dO ∘ O): written by the dQ launch
    cfg = _blocks(D, q.dtype)
    scale = 1.0 / math.sqrt(D)
    n_seg = cu.shape[0] - 1
    common = dict(GROUP=H // KV, BLOCK_D=cfg["BLOCK_D"], PRECISION=_precision(q.dtype))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0))
    BM, BN, opts = cfg["dq"]
    _dq_kernel[(n_seg, triton.cdiv(max_seqlen, BM), H)](
        q, k, v, out, do, dq, lse, delta, cu, c0, c1, *strides, D, scale * _LOG2E, scale,
        BLOCK_M=BM, BLOCK_N=BN, **common, **opts)
    BM, BN, opts = cfg["dkdv"]
    _dkdv_kernel[(n_seg, triton.cdiv(max_seqlen, BN), KV)](
        q, k, v, do, dk, dv, lse, delta, cu, c0, c1, *strides, D, scale * _LOG2E, scale,
        CTX=False, BLOCK_M=BM, BLOCK_N=BN, **common, **opts)
    if max_ctx > 0:  # after the OWN launch: it adds to the rows that launch wrote
        _dkdv_kernel[(n_seg, triton.cdiv(max_ctx, BN), KV)](
            q, k, v, do, dk, dv, lse, delta, cu, c0, c1, *strides, D, scale * _LOG2E, scale,
            CTX=True, BLOCK_M=BM, BLOCK_N=BN, **common, **opts)
    return dq, dk, dv


class BranchAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, ctx_start, ctx_end, max_seqlen, max_ctx):
        _check(q, k, v, cu_seqlens, ctx_start, ctx_end)
        q, k, v = (t.contiguous() for t in (q, k, v))  # the gradients and dO share these strides
        cu, c0, c1 = _int32(cu_seqlens), _int32(ctx_start), _int32(ctx_end)
        out, lse = branch_attention_forward(q, k, v, cu, c0, c1, max_seqlen)
        ctx.save_for_backward(q, k, v, out, lse, cu, c0, c1)
        ctx.max_seqlen, ctx.max_ctx = max_seqlen, max_ctx
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu, c0, c1 = ctx.saved_tensors
        dq, dk, dv = branch_attention_backward(do, q, k, v, out, lse, cu, c0, c1, ctx.max_seqlen, ctx.max_ctx)
        return dq, dk, dv, None, None, None, None, None


def branch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     ctx_start: torch.Tensor, ctx_end: torch.Tensor, max_seqlen: int, max_ctx: int) -> torch.Tensor:
    """q (N, H, D), k and v (N, KV, D); segments cu_seqlens (S+1,), contexts ctx_start/ctx_end (S,)
    (equal where a segment has none); max_seqlen / max_ctx: the longest segment / context.
    Returns (N, H, D); see the module docstring. On CPU it needs TRITON_INTERPRET=1."""
    return BranchAttentionFunction.apply(q, k, v, cu_seqlens, ctx_start, ctx_end, max_seqlen, max_ctx)
