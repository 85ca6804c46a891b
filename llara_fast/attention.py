"""Packed attention backends over one PackedBatch (DESIGN §4).

All backends take q (N, H, D), k and v (N, KV, D) for the flat token stream and return
(N, H, D). Segment s of the batch has queries cu_seqlens_q[s]:cu_seqlens_q[s+1] and keys
k_index[cu_seqlens_k[s]:cu_seqlens_k[s+1]]; query i of a segment sees its keys j with
j <= i + len_k - len_q (bottom-right-aligned causal).

- ``flash_attn``:   Dao-AILab flash_attn_varlen_func (optional package, CUDA).
- ``torch_varlen``: torch.nn.attention.varlen.varlen_attn (CUDA builds of torch >= 2.10).
- ``sdpa``:         per-example dense mask + F.scaled_dot_product_attention; CPU path and reference.
- ``flex``:         torch.nn.attention.flex_attention over the token stream itself, the mask
                    rule derived from the segments (no K/V gather); compiled, CUDA only for
                    training (no CPU backward; its CPU forward, eager and dense, is what the CPU
                    tests check). Opt-in: ``auto`` never picks it; its GPU speed against
                    torch_varlen is still to be measured (benchmarks/throughput.py --attn flex).
- ``triton``:       llara_fast.kernels.branch_attention, ours: each segment reads its outside
                    context (a branch's BOS..TEXT) and its own tokens in place (no K/V gather,
                    no index_add_ in backward); forward and backward, fp32/fp16/bf16. On CUDA, or
                    on CPU under TRITON_INTERPRET=1 (the tests). Opt-in like flex until the GPU
                    suite measures it against torch_varlen (benchmarks/bench_branch_attention.py).
"""
from __future__ import annotations

import functools
import inspect
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llara_fast.batch import PackedBatch
from llara_fast.kernels.branch_attention import branch_attention

try:  # optional: pip install llara-fast[flash]
    from flash_attn import flash_attn_varlen_func
except Exception:  # ImportError, or a broken CUDA build
    flash_attn_varlen_func = None

@functools.cache
def _varlen_attn():
    """(torch.nn.attention.varlen.varlen_attn, its parameter names) on CUDA builds of torch >= 2.10,
    else (None, set()); imported on first use, since importing it pulls in TorchDynamo: ~2.5 s of CPU
    in every process that starts, CPU runs included, which never use it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None, set()
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except Exception:
    create_block_mask = flex_attention = None

BACKENDS = ("auto", "sdpa", "torch_varlen", "flash_attn", "flex", "triton")


def available_backends(device: torch.device | str, dtype: torch.dtype | None = None) -> list[str]:
    """Backends usable on this device (and dtype: the FlashAttention kernels take fp16/bf16 only)."""
    dev = torch.device(device)
    out = []
    if dev.type == "cuda" and dtype in (None, torch.float16, torch.bfloat16):
        if flash_attn_varlen_func is not None:
            out.append("flash_attn")
        if _varlen_attn()[0] is not None:
            out.append("torch_varlen")
    out.append("sdpa")
    if dev.type == "cuda" and flex_attention is not None:  # last: opt-in only
        out.append("flex")
    if dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":  # opt-in only
        out.append("triton")
    return out


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    avail = available_backends(device, dtype)
    if name == "auto":
        return avail[0]
    if name not in avail:
        why = {
            "flash_attn": "needs a CUDA device, fp16/bf16 and the flash-attn package (pip install 'llara-fast[flash]')",
            "torch_varlen": "needs a CUDA device, fp16/bf16 and torch >= 2.10 (torch.nn.attention.varlen)",
            "flex": "needs a CUDA device (flex_attention has no CPU backward) and torch >= 2.5",
            "triton": "needs a CUDA device (on CPU, TRITON_INTERPRET=1 runs it interpreted, for tests)",
        }[name]
        raise RuntimeError(f"attention backend {name!r} is unavailable on {device}: {why}")
    return name


@dataclass
class AttnMeta:
    """What the chosen backend needs, computed once per batch and shared by all layers."""
    backend: str
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    k_index: torch.Tensor
    # sdpa only: per example (token start, token end, bool mask (L, L) or None for plain causal).
    blocks: list | None = None
    # flex only: the BlockMask over (token, token) of the stream.
    block_mask: object | None = None
    # triton only: each segment's outside context ctx_start:ctx_end (S,) and the longest one.
    ctx_start: torch.Tensor | None = None
    ctx_end: torch.Tensor | None = None
    max_ctx: int = 0


def build_meta(batch: PackedBatch, backend: str) -> AttnMeta:
    extra = {}
    if backend == "sdpa":
        extra["blocks"] = _example_blocks(batch)
    elif backend == "flex":
        extra["block_mask"] = _flex_block_mask(batch)
    elif backend == "triton":
        extra["ctx_start"], extra["ctx_end"], extra["max_ctx"] = branch_contexts(
            batch.cu_seqlens_q, batch.cu_seqlens_k, batch.k_index, batch.input_ids.shape[0])
    return AttnMeta(backend, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k,
                    batch.k_index, **extra)


def _example_blocks(batch: PackedBatch) -> list:
    """Dense boolean masks over independent blocks of the token stream, built from
    cu_seqlens and k_index alone.

    A block is a maximal run of consecutive segments whose tokens and keys overlap (for
    training batches: an example's main and branch segments; for encoding batches: one
    segment). Attention never crosses blocks, so each is one small SDPA call."""
    cu_q = batch.cu_seqlens_q.tolist()
    cu_k = batch.cu_seqlens_k.tolist()
    k_index = batch.k_index.cpu()
    n = batch.input_ids.shape[0]
    if cu_q[0] != 0 or cu_q[-1] != n:  # the blocks must tile the stream (DESIGN §3: no padding)
        raise ValueError(f"malformed PackedBatch: its segments cover tokens {cu_q[0]}..{cu_q[-1]} of {n}")
    segs = []  # (q0, q1, keys)
    for s in range(len(cu_q) - 1):
        keys = k_index[cu_k[s]:cu_k[s + 1]]  # (lk,) token indices
        segs.append((cu_q[s], cu_q[s + 1], keys))
    groups: list[list] = []
    hi = -1
    for q0, q1, keys in segs:
        lo = min(q0, int(keys.min())) if len(keys) else q0
        if groups and lo < hi:
            groups[-1].append((q0, q1, keys))
        else:
            groups.append([(q0, q1, keys)])
        hi = max(hi, q1, int(keys.max()) + 1 if len(keys) else q1)
    blocks = []
    dev = batch.input_ids.device
    for g in groups:
        a = min(min(q0, int(k.min()) if len(k) else q0) for q0, _, k in g)
        b = max(max(q1, int(k.max()) + 1 if len(k) else q1) for _, q1, k in g)
        if a != g[0][0] or b != g[-1][1]:
            raise ValueError(f"malformed PackedBatch: keys of tokens {g[0][0]}..{g[-1][1]} reach {a}..{b}")
        if len(g) == 1 and torch.equal(g[0][2], torch.arange(a, b, dtype=g[0][2].dtype)):
            blocks.append((a, b, None))  # one segment over its own tokens: plain causal, no mask needed
            continue
        mask = torch.zeros(b - a, b - a, dtype=torch.bool)
        for q0, q1, keys in g:
            lq, lk = q1 - q0, len(keys)
            rows = mask[q0 - a:q1 - a]  # a view: writes land in mask
            rows[:, keys - a] = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)  # (lq, lk)
        blocks.append((a, b, mask.to(dev)))
    return blocks


def _split_keys(cu_q: torch.Tensor, cu_k: torch.Tensor, k_index: torch.Tensor, n: int, backend: str):
    """Checks that each segment's key list is (outside keys) + (its own queries, in order), with
    a token an outside key of at most one segment, which the packers produce, and every key a
    token of the stream (a few host syncs per batch on a GPU). Returns (cu_q, cu_k int64, seg_k (n_keys,) segment of each key, place (n_keys,) in
    its segment's outside keys (or -1 for its own), n_ext (S,) outside keys per segment)."""
    dev = k_index.device
    cu_q, cu_k = cu_q.to(dev, torch.int64), cu_k.to(dev, torch.int64)
    n_seg, n_keys = len(cu_q) - 1, len(k_index)
    seg_k = torch.searchsorted(cu_k[1:], torch.arange(n_keys, device=dev), right=True)  # (n_keys,)
    n_ext = (cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])  # (n_seg,) outside keys per segment
    j = torch.arange(n_keys, device=dev) - cu_k[seg_k]  # (n_keys,) place in its segment's key list
    own = j >= n_ext[seg_k]
    kidx = k_index.to(torch.int64)
    tail_ok = torch.equal(kidx[own], cu_q[seg_k[own]] + j[own] - n_ext[seg_k[own]])
    outside = kidx[~own]
    if int(cu_q[0]) != 0 or int(cu_q[-1]) != n:  # the segments tile the stream (no padding)
        raise ValueError(f"malformed PackedBatch: its segments cover tokens {int(cu_q[0])}..{int(cu_q[-1])} of {n}")
    if n_keys and (int(kidx.min()) < 0 or int(kidx.max()) >= n):
        raise ValueError(f"malformed PackedBatch: k_index holds {int(kidx.min())}..{int(kidx.max())}, outside the "
                         f"stream's {n} tokens")
    if (n_seg and bool((n_ext < 0).any())) or not tail_ok or (
            outside.numel() and int(torch.bincount(outside, minlength=n).max()) > 1):
        raise ValueError(f"{backend} backend: this PackedBatch's key lists are not (outside context) + "
                         "(the segment's own queries) with each outside key used once; use sdpa")
    return cu_q, cu_k, seg_k, torch.where(own, -1, j), n_ext


def flex_mask_tensors(cu_q: torch.Tensor, cu_k: torch.Tensor, k_index: torch.Tensor, n: int):
    """(seg, ext) over the n tokens of the stream such that query token q sees token kv iff
    ``(seg[kv] == seg[q] and kv <= q) or ext[kv] == seg[q]``.

    seg[t] is the segment that has t among its queries; ext[t] is the segment (or -1) that has
    t among its keys without it being one of its queries: the BOS..TEXT context of a branch
    segment. This is the segments' bottom-right-aligned causal rule exactly when the key lists
    pass _split_keys' check."""
    cu_q, _, seg_k, place, _ = _split_keys(cu_q, cu_k, k_index, n, "flex")
    dev = k_index.device
    seg = torch.searchsorted(cu_q[1:], torch.arange(n, device=dev), right=True)  # (n,)
    outside = place >= 0
    ext = torch.full((n,), -1, dtype=torch.int64, device=dev)
    ext[k_index.to(torch.int64)[outside]] = seg_k[outside]
    return seg, ext


def branch_contexts(cu_q: torch.Tensor, cu_k: torch.Tensor, k_index: torch.Tensor, n: int):
    """(ctx_start (S,), ctx_end (S,) int32, max_ctx): segment s's outside keys as one token range,
    which is what the triton backend reads. Beyond _split_keys' check, each segment's outside keys
    must be consecutive tokens outside its own queries (a branch's BOS..TEXT is). Computed on
    the host (three copies there, two back) rather than with a host sync per check on the GPU."""
    dev = k_index.device
    cu_q, cu_k, k_index = cu_q.cpu(), cu_k.cpu(), k_index.cpu()
    cu_q, cu_k, seg_k, place, n_ext = _split_keys(cu_q, cu_k, k_index, n, "triton")
    kidx = k_index.to(torch.int64)
    has = n_ext > 0  # (S,)
    first = kidx[cu_k[:-1].clamp(max=len(kidx) - 1)] if len(kidx) else torch.zeros_like(n_ext)  # (S,)
    c0 = torch.where(has, first, 0)  # (S,)
    c1 = c0 + n_ext  # (S,)
    outside = place >= 0
    s_out, t_out = seg_k[outside], kidx[outside]  # segment and token of each outside key
    if not torch.equal(t_out, c0[s_out] + place[outside]) or bool(
            ((t_out >= cu_q[s_out]) & (t_out < cu_q[s_out + 1])).any()):
        raise ValueError("triton backend: a segment's outside keys are not one range of consecutive tokens "
                         "outside its own queries; use sdpa")
    c0, c1 = (t.to(torch.int32).to(dev, non_blocking=True) for t in (c0, c1))
    return c0, c1, int(n_ext.max()) if len(n_ext) else 0


def _flex_block_mask(batch: PackedBatch):
    n, dev = batch.input_ids.shape[0], batch.input_ids.device
    seg, ext = flex_mask_tensors(batch.cu_seqlens_q.cpu(), batch.cu_seqlens_k.cpu(), batch.k_index.cpu(), n)
    seg, ext = seg.to(dev, non_blocking=True), ext.to(dev, non_blocking=True)  # checked on the host: few syncs

    def mask_mod(b, h, q_idx, kv_idx):
        return ((seg[q_idx] == seg[kv_idx]) & (kv_idx <= q_idx)) | (ext[kv_idx] == seg[q_idx])

    return create_block_mask(mask_mod, None, None, n, n, device=batch.input_ids.device)


_flex_compiled = None


def _flex(q, k, v, meta: AttnMeta) -> torch.Tensor:
    global _flex_compiled
    fn = flex_attention
    if q.is_cuda:  # eager flex materialises the scores; compiled, it is a fused kernel
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=True)
        fn = _flex_compiled
    H, KV = q.shape[1], k.shape[1]
    out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],  # (1, H|KV, N, D)
             block_mask=meta.block_mask, enable_gqa=KV != H)  # (1, H, N, D)
    return out[0].transpose(0, 1)  # (N, H, D)


def _sdpa(q, k, v, meta: AttnMeta) -> torch.Tensor:
    H, KV = q.shape[1], k.shape[1]
    # The blocks tile the stream: one split and one cat. Slicing q/k/v per block and writing
    # out[a:b] would cost, in backward, a zero-filled full-size gradient per block and tensor.
    sizes = [b - a for a, b, _ in meta.blocks]
    outs = []
    for (_, _, mask), qb, kb, vb in zip(meta.blocks, q.split(sizes), k.split(sizes), v.split(sizes)):
        # 4-D inputs: with 3-D ones PyTorch's CPU dispatcher falls back to the unfused math kernel
        # (about 3x slower here); the fused flash kernel takes the same boolean mask, and with
        # is_causal (no mask) it skips the blocks above the diagonal.
        oe = F.scaled_dot_product_attention(qb.transpose(0, 1)[None], kb.transpose(0, 1)[None],  # (1, H|KV, L, D)
                                            vb.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                                            enable_gqa=KV != H)[0]  # (H, L, D)
        outs.append(oe.transpose(0, 1))  # (L, H, D)
    return torch.cat(outs) if outs else torch.empty_like(q)  # (N, H, D)


def _torch_varlen(q, k, v, meta: AttnMeta) -> torch.Tensor:
    varlen_attn, params = _varlen_attn()
    ks = k.index_select(0, meta.k_index)  # (N_k, KV, D)
    vs = v.index_select(0, meta.k_index)  # (N_k, KV, D)
    kw = {}
    H, KV = q.shape[1], k.shape[1]
    if KV != H:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            ks = ks.repeat_interleave(H // KV, dim=1)  # (N_k, H, D)
            vs = vs.repeat_interleave(H // KV, dim=1)  # (N_k, H, D)
    # torch 2.10 took is_causal; later releases take window_size=(left, right) instead,
    # where (-1, 0) is causal aligned bottom-right like FlashAttention.
    if "is_causal" in params:
        kw["is_causal"] = True
    elif "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn has neither is_causal nor window_size; "
                           "this torch release is not supported by the torch_varlen backend")
    out = varlen_attn(q, ks, vs, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q,
                      meta.max_seqlen_k, **kw)
    return out[0] if isinstance(out, tuple) else out


def _flash_attn(q, k, v, meta: AttnMeta) -> torch.Tensor:
    ks = k.index_select(0, meta.k_index)  # (N_k, KV, D)
    vs = v.index_select(0, meta.k_index)  # (N_k, KV, D)
    return flash_attn_varlen_func(q, ks, vs, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q,
                                  meta.max_seqlen_k, softmax_scale=1.0 / math.sqrt(q.shape[-1]), causal=True)


def _triton(q, k, v, meta: AttnMeta) -> torch.Tensor:
    return branch_attention(q, k, v, meta.cu_seqlens_q, meta.ctx_start, meta.ctx_end, meta.max_seqlen_q,
                            meta.max_ctx)  # (N, H, D)


_IMPLS = {"sdpa": _sdpa, "torch_varlen": _torch_varlen, "flash_attn": _flash_attn, "flex": _flex,
          "triton": _triton}


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
    return _IMPLS[meta.backend](q, k, v, meta)


def prepare_compile() -> None:
    """Call before torch.compile of code that calls packed_attention (train.parallel.apply_compile
    does): the Triton backend then runs as its own region, its launches not traced. Not a decorator:
    torch.compiler.disable imports TorchDynamo, ~2.5 s of CPU in every process that starts, CPU runs
    included, which never compile."""
    if _IMPLS["triton"] is _triton:
        _IMPLS["triton"] = torch.compiler.disable(_triton)
