"""Plain-PyTorch references for the fused kernels: materialised fp32 logits, direct
transcription of DESIGN §1. Used by the kernels' tests and benchmarks. Logits are fp32 for
fp32/fp16/bf16 inputs and float64 for float64 inputs (the tests' exact-algebra runs)."""
from __future__ import annotations

import math

import torch


def bow_xent_reference(hidden: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, ids: torch.Tensor,
                       pooling: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (E, K, d) rows at the special positions, weight (V, d), targets in CSR form.
    Returns (loss (E,) fp32 with 0 where the target set is empty, valid (E,) bool):
    loss_e = logsumexp(z_e) - mean_{t in set(T_e)} z_e[t], z_e = pool_k(hidden_e @ weight^T)."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(acc) @ weight.to(acc).t()  # (E, K, V)
    return bow_xent_from_logits(logits, offsets, ids, pooling)


def bow_xent_from_logits(logits: torch.Tensor, offsets: torch.Tensor, ids: torch.Tensor,
                         pooling: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of bow_xent_reference from materialised logits (E, K, V)."""
    z = logits.max(dim=1).values if pooling == "max" else logits.mean(dim=1)  # (E, V)
    lse = torch.logsumexp(z, dim=-1)  # (E,)
    losses, valid = [], []
    offs = offsets.tolist()
    for e in range(logits.shape[0]):
        targets = sorted(set(ids[offs[e]:offs[e + 1]].tolist()))
        if targets:
            losses.append(lse[e] - z[e, targets].mean())
            valid.append(True)
        else:
            losses.append(z.new_zeros(()) * lse[e])  # keeps the graph; contributes nothing
            valid.append(False)
    return torch.stack(losses), torch.tensor(valid, device=logits.device)


def linear_xent_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over rows: hidden (M, d), weight (V, d), targets (M,)."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(acc) @ weight.to(acc).t()  # (M, V)
    return torch.nn.functional.cross_entropy(logits, targets)


def branch_attention_mask(cu_seqlens: torch.Tensor, ctx_start: torch.Tensor, ctx_end: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: query token i sees key token j (the rule of kernels/branch_attention.py)."""
    cu, c0, c1 = cu_seqlens.long().cpu(), ctx_start.long().cpu(), ctx_end.long().cpu()
    N = int(cu[-1])
    seg = torch.searchsorted(cu[1:], torch.arange(N), right=True)  # (N,) segment of each token
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    own = (seg[:, None] == seg[None, :]) & (j <= i)  # (N, N)
    ctx = (j >= c0[seg][:, None]) & (j < c1[seg][:, None])  # (N, N)
    return own | ctx


def branch_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               ctx_start: torch.Tensor, ctx_end: torch.Tensor) -> torch.Tensor:
    """Dense masked softmax attention over the stream, fp32 (float64 for float64 inputs):
    q (N, H, D), k and v (N, KV, D) -> (N, H, D) in q's dtype."""
    H, KV, D = q.shape[1], k.shape[1], q.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    mask = branch_attention_mask(cu_seqlens, ctx_start, ctx_end).to(q.device)  # (N, N)
    kr = k.to(acc).repeat_interleave(H // KV, dim=1)  # (N, H, D)
    vr = v.to(acc).repeat_interleave(H // KV, dim=1)  # (N, H, D)
    scores = torch.einsum("ihd,jhd->hij", q.to(acc), kr) / math.sqrt(D)  # (H, N, N)
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # (H, N, N)
    return torch.einsum("hij,jhd->ihd", p, vr).to(q.dtype)  # (N, H, D)
