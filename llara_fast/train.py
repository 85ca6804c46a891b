"""The training step: forward, loss, backward, optimizer step. The one place that both
`llara_fast.pretrain` and `benchmarks/throughput.py` call, so the benchmark measures
exactly what training runs."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from llara_fast.loss import LossConfig, llara_loss, loss_denominators


class LlaraTrainModule(nn.Module):
    """Model + LLaRA loss as one module, so that FSDP's root (embedding, final norm, LM head)
    is unsharded while the loss reads the head. Returns plain tensors (FSDP hooks on outputs)."""

    def __init__(self, model: nn.Module, loss_cfg: LossConfig):
        super().__init__()
        self.model = model
        self.loss_cfg = loss_cfg

    def forward(self, batch, denominators: torch.Tensor | None = None):  # denominators: (3,) int64
        hidden = self.model(batch)  # (N, d)
        out = llara_loss(hidden, batch, self.model.lm_head_weight, self.loss_cfg, denominators)
        return out.total, torch.stack([out.lm, out.ebae, out.ebar])


@dataclass
class StepResult:
    loss: float
    lm: float
    ebae: float
    ebar: float
    grad_norm: float
    tokens: int          # real tokens in the step's global batch
    examples: int        # passages in the step's global batch
    attn_pairs: int      # allowed (query, key) pairs, for FLOP accounting
    head_positions: int  # rows the LM head is applied to
    seconds: float
    skipped: bool        # non-finite loss or gradient: no update was made
    data_hash: int       # fingerprint of the step's global batch (same for any number of ranks)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _world() > 1:
        dist.all_reduce(t)
    return t


def check_batch_ids(batches: list, vocab: int) -> None:
    """Token and target ids inside the vocabulary, checked on the host copy before any kernel runs
    (on the GPU the kernels do not check: that would cost a host synchronisation)."""
    for i, b in enumerate(batches):
        for name in ("input_ids", "lm_targets", "sum_ids", "pred_ids"):
            t = getattr(b, name)
            if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
                bad = int(t.max()) if int(t.max()) >= vocab else int(t.min())
                raise ValueError(f"micro-batch {i}: {name} holds id {bad}, outside the model's vocabulary "
                                 f"[0, {vocab}); was the data prepared with this model's tokenizer?")


def train_step(module: LlaraTrainModule, batches: list, optimizer: torch.optim.Optimizer, scheduler=None, *,
               device: torch.device, grad_clip: float = 1.0) -> StepResult:
    """One optimizer step over this rank's micro-batches. Each part of the loss is normalised by
    the step's global count (all micro-batches of all ranks), so the result does not depend on
    how the global batch is split across micro-batches and ranks."""
    t0 = time.perf_counter()
    check_batch_ids(batches, module.model.args.vocab_size)
    world = _world()
    rank = dist.get_rank() if world > 1 else 0
    local = torch.stack([loss_denominators(b) for b in batches]).sum(0)  # (3,) on CPU
    # micro-batch i of rank r is the step's global micro-batch i * world + r (PackedLoader dp dealing)
    data_hash = sum(int(b.input_ids.sum()) * (i * world + rank + 1) for i, b in enumerate(batches))
    stats = torch.tensor([sum(b.num_tokens for b in batches), sum(b.num_examples for b in batches),
                          sum(b.attn_pairs() for b in batches),
                          sum(b.lm_positions.numel() + 2 * b.sum_positions.numel() for b in batches), data_hash],
                         dtype=torch.float64)
    counts = _all_reduce(torch.cat([local.double(), stats]).to(device))  # one small collective
    # Integer counts: FSDP's mixed precision casts floating forward inputs to bf16, which would
    # round a token count (3,382 -> 3,376) and mis-scale the loss; integer tensors pass unchanged.
    denominators = counts[:3].round().long()
    parts = torch.zeros(4, device=device, dtype=torch.float32)  # total, lm, ebae, ebar
    for i, batch in enumerate(batches):
        if hasattr(module, "set_requires_gradient_sync"):  # FSDP2: reduce once, after the last
            module.set_requires_gradient_sync(i == len(batches) - 1)
        batch = batch.to(device, non_blocking=True)
        total, p = module(batch, denominators)
        # FSDP averages gradients over ranks; the loss is already a global mean, so undo that.
        (total * world).backward()
        parts += torch.cat([total.detach()[None], p])
    _all_reduce(parts)
    grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    vals = torch.cat([parts, grad_norm.float().reshape(1).to(device)]).tolist()  # the step's one host sync
    skipped = not all(math.isfinite(v) for v in vals)
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
    c = counts.tolist()
    return StepResult(loss=vals[0], lm=vals[1], ebae=vals[2], ebar=vals[3], grad_norm=vals[4],
                      tokens=int(c[3]), examples=int(c[4]), attn_pairs=int(c[5]), head_positions=int(c[6]),
                      seconds=time.perf_counter() - t0, skipped=skipped, data_hash=int(c[7]))


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
