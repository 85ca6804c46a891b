"""The optimizer step, one core for every objective (LLaRA pretraining, contrastive fine-tuning),
and the optimizer and learning-rate schedule it steps.

An objective (llara_fast.objectives) says what a step needs: the step's counts (reduced over
ranks once, before any forward, so each loss is normalised by the global batch), the forward of
one micro-batch (loss, and the parts to log), and what the logged values mean. The core does
the rest: gradient-sync toggling, the backward of world x loss (FSDP averages gradients over
ranks; the loss is already a global mean), the reduction of the logged parts, gradient clipping,
the step's one host synchronisation, and skipping a non-finite update.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn


class Objective(Protocol):
    n_parts: int  # values logged per step (the loss first)

    def check(self, micro_batches: Sequence) -> None:
        """Host-side checks of the step's micro-batches, before any kernel runs."""

    def counts(self, micro_batches: Sequence) -> torch.Tensor:
        """(C,) float64 on the CPU: this rank's counts, summed over ranks by the core."""

    def forward(self, module: nn.Module, micro_batch, counts: torch.Tensor, device: torch.device):
        """(loss (), parts (n_parts,) detached) of one micro-batch; counts: the step's global counts."""

    # Optional: prepare(module, micro_batches, counts, device), called once before the first
    # forward of a step (GradCache embeds the whole step there).


@dataclass
class StepStats:
    parts: list[float]   # the objective's logged values, summed over micro-batches and ranks
    counts: list[float]  # the objective's counts, summed over ranks
    grad_norm: float
    seconds: float
    skipped: bool        # non-finite loss or gradient: no update was made


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def optimizer_step(module: nn.Module, micro_batches: Sequence, optimizer: torch.optim.Optimizer, scheduler,
                   objective: Objective, *, device: torch.device, grad_clip: float = 1.0) -> StepStats:
    """One optimizer step over this rank's micro-batches (every rank holds the same number)."""
    t0 = time.perf_counter()
    objective.check(micro_batches)
    world = world_size()
    counts = all_reduce_(objective.counts(micro_batches).to(device))  # one small collective
    if hasattr(objective, "prepare"):  # e.g. GradCache's first pass over the whole step
        objective.prepare(module, micro_batches, counts, device)
    # the logged values in the (master) parameters' dtype, fp32 at least: float64 in a float64 run
    acc = torch.promote_types(next(module.parameters(), torch.empty(0)).dtype, torch.float32)
    parts = torch.zeros(objective.n_parts, device=device, dtype=acc)
    for i, mb in enumerate(micro_batches):
        if hasattr(module, "set_requires_gradient_sync"):  # FSDP2: reduce once, after the last
            module.set_requires_gradient_sync(i == len(micro_batches) - 1)
        loss, p = objective.forward(module, mb, counts, device)
        (loss * world).backward()
        parts += p
    all_reduce_(parts)
    params = [p for p in module.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    vals = torch.cat([parts, grad_norm.to(acc).reshape(1).to(device)]).tolist()  # the step's one host sync
    skipped = not all(math.isfinite(v) for v in vals)
    if not skipped:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(vals[:-1], counts.tolist(), vals[-1], time.perf_counter() - t0, skipped)


def fused_adamw_ok(params) -> bool:
    """Whether torch's fused AdamW runs these parameters: all on CUDA, or all on the CPU (where it
    is ~6x faster than the foreach path; it also takes FSDP2's DTensors)."""
    types = {p.device.type for p in params}
    return types in ({"cuda"}, {"cpu"})


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms (1-D parameters). Fused where torch has a fused kernel."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = fused_adamw_ok(decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def lr_lambda(warmup: int, total: int, decay: str = "cosine", min_ratio: float = 0.1):
    """Linear warmup over `warmup` steps, then cosine / linear decay to min_ratio, or constant."""
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"lr decay must be cosine, linear or constant, got {decay!r}")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay == "constant" or total <= warmup:
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        if decay == "linear":
            return 1.0 - (1.0 - min_ratio) * frac
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return f
