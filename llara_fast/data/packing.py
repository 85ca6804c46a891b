"""PackedBatch (DESIGN §3) and the pure-Python reference packer.

E examples are laid back to back in one flat stream, no padding. Example e occupies

    [ main: PREFIX TEXT SUM ][ branch: PRED ]

and contributes two attention segments, main then branch. The branch's keys are that
example's PREFIX..TEXT followed by PRED itself (gathered through ``k_index``) under
bottom-right-aligned causal masking, so PRED never sees SUM. Positions run 0.. over the
main segment and restart for PRED at the position of SUM's first token.

``max_len`` caps the TEXT tokens of an example (the reference's passage cutoff); the
fixed prompt pieces come on top of it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from llara_fast.data.templates import Template


@dataclass
class Example:
    text_ids: np.ndarray      # (T,) passage tokens, no special tokens
    sum_targets: np.ndarray   # (|A|,) unique EBAE target ids
    pred_targets: np.ndarray  # (|R|,) unique EBAR target ids


@dataclass
class PackedBatch:
    input_ids: torch.Tensor       # (N,) int64
    position_ids: torch.Tensor    # (N,) int64
    cu_seqlens_q: torch.Tensor    # (2E+1,) int32, segment boundaries in the token stream
    cu_seqlens_k: torch.Tensor    # (2E+1,) int32, segment boundaries in the key stream
    max_seqlen_q: int
    max_seqlen_k: int
    k_index: torch.Tensor         # (N_k,) int64, token index of each key-stream entry
    lm_positions: torch.Tensor    # (M,) int64, positions whose next token is a TEXT token
    lm_targets: torch.Tensor      # (M,) int64
    sum_positions: torch.Tensor   # (E, K) int64, positions of <s1>..<sK>
    pred_positions: torch.Tensor  # (E, K) int64, positions of <s9>..<s(8+K)>
    sum_offsets: torch.Tensor     # (E+1,) int64, CSR offsets into sum_ids
    sum_ids: torch.Tensor         # (nnz,) int64
    pred_offsets: torch.Tensor    # (E+1,) int64
    pred_ids: torch.Tensor        # (nnz,) int64

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_examples(self) -> int:
        return int(self.sum_positions.shape[0])

    def attn_pairs(self) -> int:
        """(query, key) pairs the mask allows, for FLOP accounting."""
        lq = (self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).long()
        lk = (self.cu_seqlens_k[1:] - self.cu_seqlens_k[:-1]).long()
        return int((lq * (lk - lq) + lq * (lq + 1) // 2).sum())

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return PackedBatch(**kw)

    def pin_memory(self) -> "PackedBatch":
        kw = {f.name: (getattr(self, f.name).pin_memory() if isinstance(getattr(self, f.name), torch.Tensor)
                       else getattr(self, f.name)) for f in fields(self)}
        return PackedBatch(**kw)

    @classmethod
    def from_numpy(cls, arrays: dict) -> "PackedBatch":
        """Wrap numpy buffers without copying (dtypes must already match the contract)."""
        kw = {}
        for f in fields(cls):
            v = arrays[f.name]
            kw[f.name] = torch.from_numpy(v) if isinstance(v, np.ndarray) else int(v)
        return cls(**kw)


def example_num_tokens(text_len: int, template: Template, max_len: int) -> int:
    """Tokens an example occupies in the stream once its text is cut to max_len."""
    return (len(template.prefix_ids) + min(text_len, max_len) + len(template.sum_ids)
            + len(template.pred_ids))


def pack_reference(examples: Sequence[Example], template: Template, max_len: int) -> PackedBatch:
    """Lay out ``examples`` as one PackedBatch (plain Python; the contract the C++ packer matches)."""
    if len(examples) == 0:
        raise ValueError("pack_reference: no examples")
    prefix = list(template.prefix_ids)
    sum_ids, pred_ids = list(template.sum_ids), list(template.pred_ids)
    P, S, R = len(prefix), len(sum_ids), len(pred_ids)
    if P == 0:
        raise ValueError("template prefix is empty: the LM loss needs a token before the text")
    tokens, positions, k_index = [], [], []
    cu_q, cu_k = [0], [0]
    lm_pos, lm_tgt, sum_pos, pred_pos = [], [], [], []
    sum_off, sum_tg, pred_off, pred_tg = [0], [], [0], []
    for ex in examples:
        text = [int(t) for t in ex.text_ids[:max_len]]
        T = len(text)
        start = len(tokens)
        main = prefix + text + sum_ids
        tokens += main + pred_ids
        positions += list(range(P + T + S)) + list(range(P + T, P + T + R))
        branch_start = start + P + T + S
        k_index += list(range(start, branch_start))                              # main keys
        k_index += list(range(start, start + P + T)) + list(range(branch_start, branch_start + R))
        cu_q += [cu_q[-1] + P + T + S, cu_q[-1] + P + T + S + R]
        cu_k += [cu_k[-1] + P + T + S, cu_k[-1] + P + T + S + P + T + R]
        lm_pos += [start + P - 1 + j for j in range(T)]
        lm_tgt += text
        sum_pos.append([start + P + T + o for o in template.sum_special_offsets])
        pred_pos.append([branch_start + o for o in template.pred_special_offsets])
        sum_tg += [int(t) for t in ex.sum_targets]
        pred_tg += [int(t) for t in ex.pred_targets]
        sum_off.append(len(sum_tg))
        pred_off.append(len(pred_tg))
    lq = np.diff(cu_q)
    lk = np.diff(cu_k)

    def i64(x):
        return torch.tensor(x, dtype=torch.int64)

    K = template.n_special
    return PackedBatch(
        input_ids=i64(tokens), position_ids=i64(positions),
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32), cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32),
        max_seqlen_q=int(lq.max()), max_seqlen_k=int(lk.max()), k_index=i64(k_index),
        lm_positions=i64(lm_pos), lm_targets=i64(lm_tgt),
        sum_positions=i64(sum_pos).reshape(-1, K), pred_positions=i64(pred_pos).reshape(-1, K),
        sum_offsets=i64(sum_off), sum_ids=i64(sum_tg), pred_offsets=i64(pred_off), pred_ids=i64(pred_tg),
    )


def greedy_groups(lengths: Iterable[int], token_budget: int) -> Iterator[list[int]]:
    """Greedy packing in order: start a new micro-batch when the next example would overflow."""
    group, used = [], 0
    for i, n in enumerate(lengths):
        if n > token_budget:
            raise ValueError(f"example {i} needs {n} tokens, more than the token budget {token_budget}; "
                             "raise the budget or lower max_len")
        if group and used + n > token_budget:
            yield group
            group, used = [], 0
        group.append(i)
        used += n
    if group:
        yield group


def pack_greedy_reference(examples: Sequence[Example], template: Template, max_len: int,
                          token_budget: int) -> list[PackedBatch]:
    lengths = [example_num_tokens(len(e.text_ids), template, max_len) for e in examples]
    return [pack_reference([examples[i] for i in g], template, max_len) for g in greedy_groups(lengths, token_budget)]


def pack_encode_reference(texts: Sequence[Sequence[int]], template: Template, kind: str,
                          max_len: int) -> tuple[PackedBatch, torch.Tensor]:
    """Encoder layout (DESIGN §1 "Encoder use"): one causal segment per text,
    PREFIX TEXT SUM for passages (kind="passage") or PREFIX TEXT PRED for queries (kind="query").
    Returns the batch and the (E, K) positions whose hidden states are averaged."""
    if kind not in ("passage", "query"):
        raise ValueError(f"kind must be 'passage' or 'query', got {kind!r}")
    if len(texts) == 0:
        raise ValueError("pack_encode_reference: no texts")
    suffix = template.sum_ids if kind == "passage" else template.pred_ids
    offsets = template.sum_special_offsets if kind == "passage" else template.pred_special_offsets
    prefix = list(template.prefix_ids)
    tokens, positions, cu, special = [], [], [0], []
    for t in texts:
        seq = prefix + [int(x) for x in t[:max_len]] + list(suffix)
        start = len(tokens)
        special.append([start + len(seq) - len(suffix) + o for o in offsets])
        tokens += seq
        positions += list(range(len(seq)))
        cu.append(len(tokens))
    n = len(tokens)
    empty = torch.zeros(0, dtype=torch.int64)
    lens = np.diff(cu)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    batch = PackedBatch(
        input_ids=torch.tensor(tokens, dtype=torch.int64), position_ids=torch.tensor(positions, dtype=torch.int64),
        cu_seqlens_q=cu_t, cu_seqlens_k=cu_t.clone(), max_seqlen_q=int(lens.max()), max_seqlen_k=int(lens.max()),
        k_index=torch.arange(n, dtype=torch.int64), lm_positions=empty, lm_targets=empty,
        sum_positions=torch.zeros(0, template.n_special, dtype=torch.int64),
        pred_positions=torch.zeros(0, template.n_special, dtype=torch.int64),
        sum_offsets=torch.zeros(1, dtype=torch.int64), sum_ids=empty,
        pred_offsets=torch.zeros(1, dtype=torch.int64), pred_ids=empty)
    return batch, torch.tensor(special, dtype=torch.int64)
