"""The contrastive fine-tuning objective (InfoNCE) and its train module.

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

GradCache (``grad_cache = true``; Gao et al. 2021): the contrastive batch is the whole step, all
micro-batches of all ranks. ``prepare`` embeds every micro-batch without a graph, computes the
InfoNCE loss of the step on those embeddings and its gradient with respect to each of this
rank's embeddings (the cross-rank gather's backward brings the other ranks' share); then each
micro-batch is re-run with a graph and back-propagated from (embeddings · cached gradient), which
gives the same parameter gradients as one forward of the whole batch, with the activation
memory of one micro-batch. The RNG state of each micro-batch's first forward is replayed for
its re-run (LoRA dropout draws the same masks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather

from llara_fast.batch import PackedBatch
from llara_fast.config import opt
from llara_fast.errors import UserError


@dataclass
class ContrastiveConfig:
    temperature: float = opt(0.01, "InfoNCE temperature (the released LLaRA fine-tuning recipe's)")
    cross_rank: bool = opt(True, "score against the passages of every data-parallel rank")
    grad_cache: bool = opt(False, "GradCache: the whole step (all micro-batches, all ranks) is one contrastive batch, "
                                  "exact, with one micro-batch's activation memory")
    chunk: int = opt(0, "with grad_cache: queries per re-run chunk (each rank's data.queries * data.grad_accum "
                        "queries are loaded in micro-batches of this many; 0: data.queries)")


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(world * n, d) concatenation of every rank's (n, d) tensor, rank order, and this rank's
    row offset. Differentiable: the backward sends each rank the sum of all ranks' gradients
    for its rows (torch.distributed.nn's all_gather)."""
    world = _world()
    if world == 1:
        return t, 0
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


def _rng_state(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class ContrastiveModule(nn.Module):
    """Model + InfoNCE as one module (FSDP's root holds the embedding and final norm)."""

    def __init__(self, model: nn.Module, cfg: ContrastiveConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, batch: PackedBatch, special: torch.Tensor, n_local: int | None, group: int, n_queries: int,
                emb_grad: torch.Tensor | None = None):
        """batch: this rank's B queries then their B * group passages, packed; special (E, K).
        (loss, hits); with ``emb_grad`` (E, d) the GradCache surrogate (embeddings · emb_grad)
        and the embeddings; with n_local None only the embeddings (E, d)."""
        hidden = self.model(batch)  # (N, d)
        emb = pooled_embeddings(hidden, special)  # (B + B * group, d)
        if n_local is None:
            return emb
        if emb_grad is not None:
            return (emb * emb_grad).sum(), emb.detach()
        loss, hits = info_nce(emb[:n_local], emb[n_local:], group, self.cfg.temperature, n_queries,
                              self.cfg.cross_rank)
        return loss, hits


@dataclass
class ContrastiveStep:
    """One optimizer step of contrastive fine-tuning, for the log."""
    loss: float
    accuracy: float      # fraction of the step's queries whose positive ranked first
    grad_norm: float
    queries: int         # in the step's global batch
    passages: int
    tokens: int
    seconds: float
    skipped: bool


class ContrastiveObjective:
    """InfoNCE for llara_fast.train.step.optimizer_step: micro-batches are ContrastiveBatches
    (llara_fast.data.loader); every rank holds the same number of the same number of queries."""
    n_parts = 2  # loss, hits

    def __init__(self, vocab_size: int, cfg: ContrastiveConfig = ContrastiveConfig()):
        self.vocab_size = vocab_size
        self.cfg = cfg
        self.n_queries = 0  # the step's global number of queries, set by counts()
        self._cache: list = []  # GradCache, per micro-batch: (RNG state, embeddings, their gradient)
        self._parts: torch.Tensor | None = None
        self._next = 0
        self._replay = torch.zeros(())  # GradCache: max |re-run - first embeddings| of the step, on the device

    @property
    def replay_error(self) -> float:
        """GradCache: the largest difference between a re-run's embeddings and its first pass's in
        the last step (0.0: the replay was exact). Reading it synchronises with the device."""
        return float(self._replay)

    def check(self, micro_batches) -> None:
        for i, mb in enumerate(micro_batches):
            ids = mb.batch.input_ids
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
                raise UserError(f"micro-batch {i}: token id outside the model's vocabulary [0, {self.vocab_size})")

    def counts(self, micro_batches) -> torch.Tensor:
        """(2,) float64: tokens and passages of this rank's micro-batches."""
        self.n_queries = sum(mb.n_queries for mb in micro_batches) * _world()
        return torch.tensor([sum(mb.batch.num_tokens for mb in micro_batches),
                             sum(mb.n_queries * mb.group for mb in micro_batches)], dtype=torch.float64)

    def prepare(self, module: nn.Module, micro_batches, counts: torch.Tensor, device: torch.device) -> None:
        """GradCache's first pass (no graph): the step's loss and its gradient w.r.t. every
        embedding of this rank, cached per micro-batch for forward()."""
        if not self.cfg.grad_cache:
            return
        if len({mb.group for mb in micro_batches}) > 1:
            raise ValueError("GradCache: the micro-batches of a step differ in group size")
        self._cache, embs = [], []
        with torch.no_grad():
            for mb in micro_batches:
                rng = _rng_state(device)
                embs.append(module(mb.batch.to(device, non_blocking=True), mb.special.to(device), None, mb.group, 0))
                self._cache.append(rng)
        after = _rng_state(device)
        qs = torch.cat([e[:mb.n_queries] for e, mb in zip(embs, micro_batches)]).requires_grad_()  # (B, d)
        ps = torch.cat([e[mb.n_queries:] for e, mb in zip(embs, micro_batches)]).requires_grad_()  # (B * group, d)
        with torch.enable_grad():
            loss, hits = info_nce(qs, ps, micro_batches[0].group, self.cfg.temperature, self.n_queries,
                                  self.cfg.cross_rank)
            loss.backward()  # with cross_rank: the gather's backward sums every rank's share into ps.grad
        q_grads = qs.grad.split([mb.n_queries for mb in micro_batches])
        p_grads = ps.grad.split([mb.n_queries * mb.group for mb in micro_batches])
        self._cache = [(rng, e, torch.cat([gq, gp])) for rng, e, gq, gp in zip(self._cache, embs, q_grads, p_grads)]
        self._cache.append(after)
        self._parts = torch.stack([loss.detach(), hits.to(loss.dtype)])  # fp32 (float64 in a float64 run)
        self._next, self._replay = 0, torch.zeros((), device=device)

    def forward(self, module: nn.Module, mb, counts: torch.Tensor, device: torch.device):
        batch, special = mb.batch.to(device, non_blocking=True), mb.special.to(device)
        if not self.cfg.grad_cache:
            loss, hits = module(batch, special, mb.n_queries, mb.group, self.n_queries)
            return loss, torch.stack([loss.detach(), hits.to(loss.dtype)])
        rng, first, grad = self._cache[self._next]
        _set_rng_state(rng, device)
        surrogate, emb = module(batch, special, mb.n_queries, mb.group, self.n_queries, grad)
        if emb.numel():
            self._replay = torch.maximum(self._replay, (emb - first).abs().max())  # no host sync here
        parts = self._parts if self._next == 0 else torch.zeros_like(self._parts)  # the step's, logged once
        self._next += 1
        if self._next == len(self._cache) - 1:
            _set_rng_state(self._cache[-1], device)  # where the first pass left the generators
        return surrogate, parts

    def describe(self, s) -> tuple[dict, str]:
        """(metrics fields, log-line part) of a step, for the Trainer."""
        r = self.result(s)
        f = {"loss": r.loss, "accuracy": r.accuracy, "grad_norm": r.grad_norm, "queries": r.queries,
             "passages": r.passages, "tokens": r.tokens, "tokens_per_s": r.tokens / r.seconds,
             "queries_per_s": r.queries / r.seconds}
        return f, (f"loss {r.loss:.4f} | acc {r.accuracy:.3f} | gnorm {r.grad_norm:.3f} | "
                   f"{f['tokens_per_s']:.0f} tok/s {f['queries_per_s']:.2f} q/s")

    def result(self, s) -> ContrastiveStep:
        """The ContrastiveStep of a StepStats."""
        return ContrastiveStep(loss=s.parts[0], accuracy=s.parts[1] / self.n_queries, grad_norm=s.grad_norm,
                               queries=self.n_queries, passages=int(s.counts[1]), tokens=int(s.counts[0]),
                               seconds=s.seconds, skipped=s.skipped)
