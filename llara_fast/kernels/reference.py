"""Plain-PyTorch references for the fused kernels: materialised fp32 logits, direct
transcription of DESIGN §1. Used by the kernels' tests and benchmarks. Logits are fp32 for
fp32/fp16/bf16 inputs and float64 for float64 inputs (the tests' exact-algebra runs)."""
from __future__ import annotations

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
