"""The contrastive fine-tuning objective and its training step (the fine-tuning twin of train.py).

Queries are encoded with the PRED prompt (mean of <s9>..<s16>), passages with the SUM prompt
(mean of <s1>..<s8>), both L2-normalised in fp32, in ONE packed forward. Each query comes with
a group of 1 positive + k hard negatives; every query is scored against every passage of the
micro-batch — its own group, the other queries' groups (in-batch negatives) and, with
``cross_rank``, the groups of all data-parallel ranks, gathered with an all-gather that keeps
gradients. InfoNCE with temperature t:

    loss = (1 / Q) * sum_q -log softmax_j(<e_q, e_j> / t)[pos(q)]

where Q counts the queries of the whole optimizer step (all micro-batches, all ranks), so the
result does not depend on how the step is split over micro-batches when the contrastive groups
are the same.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ContrastiveConfig:
    temperature: float = 0.01        # InfoNCE temperature (the released LLaRA fine-tuning recipe's)
    cross_rank: bool = True          # score against the passages of every data-parallel rank


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(world * n, d) concatenation of every rank's (n, d) tensor, rank order, and this rank's
    row offset. Differentiable: the backward sends each rank the sum of all ranks' gradients
    for its rows (torch.distributed.nn's all_gather)."""
    world = _world()
    if world == 1:
        return t, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(t.contiguous())
    return torch.cat(parts), dist.get_rank() * t.shape[0]


def pooled_embeddings(hidden: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """hidden (N, d), special (E, K) positions -> (E, d) fp32 unit vectors (mean over the K)."""
    emb = hidden[special]  # (E, K, d)
    emb = emb.to(torch.promote_types(emb.dtype, torch.float32)).mean(1)  # (E, d), fp32 at least
    return F.normalize(emb, dim=-1)


def info_nce(q: torch.Tensor, p: torch.Tensor, group: int, temperature: float, n_queries: int,
             cross_rank: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, d) this rank's query embeddings, p (B * group, d) their passages (query i's positive
    at row i * group, then its negatives). Returns (sum of this rank's -log p(pos) / n_queries,
    number of queries whose positive scored highest)."""
    B = q.shape[0]
    if p.shape[0] != B * group:
        raise ValueError(f"info_nce: {p.shape[0]} passages for {B} queries in groups of {group}")
    p_all, offset = gather_with_grad(p) if cross_rank else (p, 0)  # (P, d)
    scores = q @ p_all.t() / temperature  # (B, P)
    target = offset + torch.arange(B, device=q.device) * group  # (B,)
    loss = F.cross_entropy(scores, target, reduction="sum") / n_queries
    hits = (scores.argmax(-1) == target).sum()
    return loss, hits


class ContrastiveModule(nn.Module):
    """Model + InfoNCE as one module (FSDP's root holds the embedding and final norm)."""

    def __init__(self, model: nn.Module, cfg: ContrastiveConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, batch, special: torch.Tensor, n_local: int, group: int, n_queries: int):
        """batch: this rank's B queries then their B * group passages, packed; special (E, K)."""
        hidden = self.model(batch)  # (N, d)
        emb = pooled_embeddings(hidden, special)  # (B + B * group, d)
        loss, hits = info_nce(emb[:n_local], emb[n_local:], group, self.cfg.temperature, n_queries,
                              self.cfg.cross_rank)
        return loss, hits


@dataclass
class ContrastiveStepResult:
    loss: float
    accuracy: float      # fraction of the step's queries whose positive ranked first
    grad_norm: float
    queries: int         # in the step's global batch
    passages: int
    tokens: int
    seconds: float
    skipped: bool


def contrastive_step(module: ContrastiveModule, micro_batches: list, optimizer, scheduler=None, *,
                     device: torch.device, grad_clip: float = 1.0) -> ContrastiveStepResult:
    """One optimizer step over this rank's micro-batches. Each micro-batch is a
    ``ContrastiveBatch`` (llara_fast.finetune); all ranks hold the same number of micro-batches
    of the same number of queries."""
    t0 = time.perf_counter()
    world = _world()
    n_local = sum(mb.n_queries for mb in micro_batches)
    n_queries = n_local * world
    group = micro_batches[0].group
    vocab = module.model.args.vocab_size
    for i, mb in enumerate(micro_batches):
        ids = mb.batch.input_ids
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"micro-batch {i}: token id outside the model's vocabulary [0, {vocab})")
    parts = torch.zeros(2, device=device, dtype=torch.float32)  # loss, hits
    for i, mb in enumerate(micro_batches):
        if hasattr(module, "set_requires_gradient_sync"):
            module.set_requires_gradient_sync(i == len(micro_batches) - 1)
        loss, hits = module(mb.batch.to(device, non_blocking=True), mb.special.to(device), mb.n_queries, group,
                            n_queries)
        # FSDP averages gradients over ranks; the loss is already a global mean, so undo that.
        (loss * world).backward()
        parts += torch.stack([loss.detach().float(), hits.float()])
    stats = torch.tensor([sum(mb.batch.num_tokens for mb in micro_batches),
                          sum(mb.n_queries * mb.group for mb in micro_batches)], dtype=torch.float32, device=device)
    both = torch.cat([parts, stats])
    if world > 1:
        dist.all_reduce(both)
    params = [p for p in module.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    vals = torch.cat([both, grad_norm.float().reshape(1).to(device)]).tolist()  # the step's one host sync
    skipped = not all(math.isfinite(v) for v in (vals[0], vals[4]))
    if not skipped:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return ContrastiveStepResult(loss=vals[0], accuracy=vals[1] / n_queries, grad_norm=vals[4], queries=n_queries,
                                 passages=int(vals[3]), tokens=int(vals[2]), seconds=time.perf_counter() - t0,
                                 skipped=skipped)
