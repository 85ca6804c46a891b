"""Fused vocabulary projection + bag-of-words cross-entropy (EBAE / EBAR, DESIGN §1, §5).

For example e with rows h_e (K, d) at its special positions and target set T_e:

    z_e    = pool_k(h_e @ W^T)                     (V,)   pool = max (default) or mean
    loss_e = logsumexp(z_e) - mean_{t in T_e} z_e[t]

The forward kernel tiles the vocabulary: each program takes one example and a slice of
vocabulary tiles, computes the (K, BLOCK_V) logits tile in registers with fp32
accumulation, pools it over the K rows, keeps an online logsumexp, and writes the pooled
row z_e (and, for max, the winning row per vocabulary entry). The (E·K, V) logits never
exist; the pooled (E, V) row is K times smaller and is what the backward needs:

    dL/dz_e = g_e · (softmax(z_e) - 1[v in T_e] / |T_e|)            routed to the argmax row

so dH[e, k] = (dz_e masked to argmax==k) @ W and dW = Σ_k (masked dz)^T @ H[:, k]: K GEMMs
of the (E, V) gradient, on tensor cores, without recomputing the projection.
Duplicate target ids count once (the targets are a set); an empty set gives loss 0.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llara_fast.kernels import acc_dtype, accumulate_mm_, check_dtypes, use_triton

_NEG = tl.constexpr(-1.0e30)  # a finite -inf for running maxima (keeps exp() free of inf - inf)


def _empty(shape, device, dtype) -> torch.Tensor:
    """Output allocation; tests swap in a poisoning allocator to catch unwritten elements."""
    return torch.empty(shape, device=device, dtype=dtype)


@triton.jit
def _bow_fwd_kernel(H, W, Z, ARG, PART_M, PART_S,
                    K, V, D, stride_he, stride_hk, stride_wv, stride_ze, tiles_per_split, n_splits,
                    POOL_MAX: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    e = tl.program_id(0)
    split = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    m_run = tl.full([1], _NEG, tl.float32)
    s_run = tl.zeros([1], tl.float32)
    n_tiles = tl.cdiv(V, BLOCK_V)
    t_end = tl.minimum((split + 1) * tiles_per_split, n_tiles)
    for t in range(split * tiles_per_split, t_end):
        offs_v = t * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        acc = tl.zeros([BLOCK_K, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            h = tl.load(H + e * stride_he + offs_k[:, None] * stride_hk + offs_d[None, :],
                        mask=k_mask[:, None] & d_mask[None, :], other=0.0)  # (BK, BD)
            w = tl.load(W + offs_v[None, :] * stride_wv + offs_d[:, None],
                        mask=v_mask[None, :] & d_mask[:, None], other=0.0)  # (BD, BV)
            acc = tl.dot(h, w, acc, input_precision=PRECISION)  # (BK, BV) fp32
        if POOL_MAX:
            acc = tl.where(k_mask[:, None], acc, float("-inf"))
            z = tl.max(acc, axis=0)  # (BV,)
            arg = tl.argmax(acc, axis=0)
            tl.store(ARG + e * stride_ze + offs_v, arg.to(tl.int8), mask=v_mask)
        else:
            z = tl.sum(acc, axis=0) / K  # padded rows are zero
        tl.store(Z + e * stride_ze + offs_v, z, mask=v_mask)
        z = tl.where(v_mask, z, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(z, axis=0))
        s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m_run = m_new
    tl.store(PART_M + e * n_splits + split + tl.arange(0, 1), m_run)
    tl.store(PART_S + e * n_splits + split + tl.arange(0, 1), s_run)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact IEEE products (no TF32), so fp32 runs match the fp32 reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(hidden, weight, offsets, ids, pooling, triton: bool):
    if pooling not in ("max", "mean"):
        raise ValueError(f"bow_xent: pooling must be 'max' or 'mean', got {pooling!r}")
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"bow_xent: expected hidden (E, K, d) and weight (V, d), got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    check_dtypes("bow_xent", hidden, weight, triton)
    if hidden.shape[1] > 127:
        raise ValueError(f"bow_xent: at most 127 rows per example, got {hidden.shape[1]}")
    if offsets.dim() != 1 or offsets.shape[0] != hidden.shape[0] + 1 or ids.dim() != 1:
        raise ValueError(f"bow_xent: offsets must be (E+1,) = ({hidden.shape[0] + 1},) and ids 1-D, got "
                         f"{tuple(offsets.shape)} and {tuple(ids.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64) or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("bow_xent: offsets and ids must be integer tensors")
    if ids.device.type == "cpu" and ids.numel():  # on CUDA this would be a host sync; the packer checks
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"bow_xent: target id {lo if lo < 0 else hi} is outside the vocabulary "
                             f"[0, {weight.shape[0]})")


def target_weights(offsets: torch.Tensor, ids: torch.Tensor, vocab: int, dtype: torch.dtype = torch.float32):
    """For CSR targets: (example of each id (nnz,), weight 1/|set| on the first occurrence of each
    distinct id and 0 on repeats (nnz,), set sizes (E,)), the weights and sizes in ``dtype``.
    Static shapes, no host sync."""
    E = offsets.shape[0] - 1
    nnz = ids.shape[0]
    seg = torch.searchsorted(offsets[1:].long(), torch.arange(nnz, device=ids.device), right=True)  # (nnz,)
    key = seg * vocab + ids.long()  # (nnz,)
    sorted_key, order = torch.sort(key, stable=True)
    first_sorted = torch.ones_like(sorted_key, dtype=torch.bool)
    first_sorted[1:] = sorted_key[1:] != sorted_key[:-1]
    first = torch.empty_like(first_sorted).scatter_(0, order, first_sorted)  # (nnz,)
    count = torch.zeros(E, device=ids.device, dtype=dtype).index_add_(0, seg, first.to(dtype))  # (E,)
    weight = first.to(dtype) / count.clamp(min=1)[seg]  # (nnz,)
    return seg, weight, count


def _bow_fwd_torch(hidden, weight, z, arg, pooling, budget_bytes: int = 32 * 2**20):
    """The forward tile pass in plain PyTorch, chunked over examples (CPU path); the logits in
    z's dtype (fp32, or float64 for float64 inputs)."""
    E, K, _ = hidden.shape
    V = weight.shape[0]
    chunk = max(1, budget_bytes // (z.element_size() * K * V))
    for e0 in range(0, E, chunk):
        logits = (hidden[e0:e0 + chunk] @ weight.t()).to(z.dtype)  # (C, K, V)
        if pooling == "max":
            zc, ac = logits.max(dim=1)  # (C, V) each
            arg[e0:e0 + chunk] = ac.to(torch.int8)
        else:
            zc = logits.mean(dim=1)  # (C, V)
        z[e0:e0 + chunk] = zc
    return torch.logsumexp(z, dim=-1)  # (E,)


def _bow_fwd_triton(hidden, weight, z, arg, pooling):
    """Launch the tile kernel: fills z (and arg), returns lse (E,)."""
    E, K, D = hidden.shape
    V = weight.shape[0]
    BLOCK_V, BLOCK_D = (512, 64) if _interpreted() else (128, 64)  # fewer, wider tiles when interpreted
    BLOCK_K = max(16, triton.next_power_of_2(K))
    n_tiles = triton.cdiv(V, BLOCK_V)
    # Enough programs to fill the GPU even for few examples: split the vocabulary.
    n_splits = max(1, min(n_tiles, _target_programs(hidden.device) // max(E, 1)))
    tiles_per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, tiles_per_split)
    part_m = _empty((E, n_splits), device=hidden.device, dtype=torch.float32)  # (E, S) running maxima
    part_s = _empty((E, n_splits), device=hidden.device, dtype=torch.float32)  # (E, S) running sums
    _bow_fwd_kernel[(E, n_splits)](
        hidden, weight, z, arg if arg is not None else z, part_m, part_s,
        K, V, D, hidden.stride(0), hidden.stride(1), weight.stride(0), z.stride(0), tiles_per_split,
        n_splits, POOL_MAX=pooling == "max", BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
        PRECISION=_precision(hidden.dtype))
    m = part_m.max(dim=1, keepdim=True).values  # (E, 1)
    return m.squeeze(1) + torch.log((part_s * torch.exp(part_m - m)).sum(1))  # (E,)


def bow_xent_forward(hidden, weight, offsets, ids, pooling: str = "max", impl: str = "auto"):
    """(loss (E,), valid (E,), saved for backward)."""
    triton_path = use_triton(hidden.device, impl, hidden.dtype)
    _check(hidden, weight, offsets, ids, pooling, triton_path)
    E, V = hidden.shape[0], weight.shape[0]
    hidden, weight = hidden.contiguous(), weight.contiguous()
    acc = acc_dtype(hidden.dtype)
    z = _empty((E, V), device=hidden.device, dtype=acc)  # (E, V) pooled logits
    arg = _empty((E, V), device=hidden.device, dtype=torch.int8) if pooling == "max" else None
    if E == 0:
        lse = z.new_zeros(0)
    elif triton_path:
        lse = _bow_fwd_triton(hidden, weight, z, arg, pooling)  # (E,)
    else:
        lse = _bow_fwd_torch(hidden, weight, z, arg, pooling)  # (E,)
    seg, w, count = target_weights(offsets, ids, V, acc)
    target_mean = torch.zeros(E, device=hidden.device, dtype=acc).index_add_(
        0, seg, z[seg, ids.long()] * w)  # (E,)
    valid = count > 0
    loss = torch.where(valid, lse - target_mean, torch.zeros_like(lse))  # (E,)
    return loss, valid, (z, arg, lse, seg, w, valid)


def bow_xent_backward(grad_loss, hidden, weight, ids, saved, pooling: str = "max"):
    z, arg, lse, seg, w, valid = saved
    E, K, _ = hidden.shape
    g = torch.where(valid, grad_loss.to(z.dtype), torch.zeros_like(grad_loss, dtype=z.dtype))  # (E,)
    dz = torch.exp(z - lse[:, None]) * g[:, None]  # (E, V) fp32 (float64), the softmax part
    dz.index_put_((seg, ids.long()), -(g[seg] * w), accumulate=True)  # minus the target mean part
    dt = hidden.dtype
    # (V, d): the first product overwrites it, so it is zero-filled only when there is none
    grad_w = (_empty if K else torch.zeros)(weight.shape, device=weight.device, dtype=z.dtype)
    if pooling == "max":
        grad_h = _empty(hidden.shape, device=hidden.device, dtype=hidden.dtype)  # (E, K, d)
        for k in range(K):
            dzk = torch.where(arg == k, dz, 0.0).to(dt)  # (E, V) routed to row k
            grad_h[:, k] = dzk @ weight  # (E, d)
            accumulate_mm_(grad_w, dzk.t(), hidden[:, k], first=k == 0)  # (V, d)
    else:
        dzm = (dz / K).to(dt)  # (E, V)
        grad_h = (dzm @ weight)[:, None, :].expand(E, K, -1).contiguous()  # (E, K, d)
        accumulate_mm_(grad_w, dzm.t(), hidden.sum(1), first=True)  # (V, d)
    return grad_h, grad_w.to(weight.dtype)  # no copy when fp32


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1 if _interpreted() else 4


class BowXentFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, offsets, ids, pooling="max", impl="auto"):
        loss, valid, saved = bow_xent_forward(hidden, weight, offsets, ids, pooling, impl)
        z, arg, lse, seg, w, valid = saved
        ctx.save_for_backward(hidden, weight, ids, z, arg if arg is not None else z.new_empty(0), lse, seg, w, valid)
        ctx.pooling = pooling
        ctx.mark_non_differentiable(valid)
        return loss, valid

    @staticmethod
    def backward(ctx, grad_loss, _grad_valid):
        hidden, weight, ids, z, arg, lse, seg, w, valid = ctx.saved_tensors
        saved = (z, arg if ctx.pooling == "max" else None, lse, seg, w, valid)
        grad_h, grad_w = bow_xent_backward(grad_loss, hidden, weight, ids, saved, ctx.pooling)
        return grad_h, grad_w, None, None, None, None


def bow_xent(hidden, weight, offsets, ids, pooling: str = "max", impl: str = "auto"):
    """(loss (E,) fp32 (float64 for float64 inputs), valid (E,) bool): per-example bag-of-words CE;
    see the module docstring."""
    return BowXentFunction.apply(hidden, weight, offsets, ids, pooling, impl)
