"""The pure-Python reference packer: Examples -> PackedBatch (llara_fast.batch, DESIGN §3).

``max_len`` caps the TEXT tokens of an example (the reference's passage cutoff); the fixed
prompt pieces come on top of it.

Two packers of one contract: ``pack_reference`` here (plain Python, the specification) and the
C++ packer in csrc/packer.cpp (multi-threaded, reads prepared shards in place), wrapped by
llara_fast.data.native, which falls back to this one with one clear message when the
extension is missing.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from llara_fast.batch import Example, PackedBatch
from llara_fast.templates import Template


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


def pack_encode_reference(texts: Sequence[Sequence[int]], template: Template, kind: str | Sequence[str],
                          max_len: int) -> tuple[PackedBatch, torch.Tensor]:
    """Encoder layout (DESIGN §1 "Encoder use"): one causal segment per text,
    PREFIX TEXT SUM for passages (kind="passage") or PREFIX TEXT PRED for queries (kind="query").
    ``kind`` is one kind for all texts or one per text (queries and passages in one batch, as
    contrastive fine-tuning packs them). Returns the batch and the (E, K) positions whose hidden
    states are averaged."""
    kinds = [kind] * len(texts) if isinstance(kind, str) else list(kind)
    if len(kinds) != len(texts):
        raise ValueError(f"pack_encode_reference: {len(kinds)} kinds for {len(texts)} texts")
    for k in set(kinds):
        if k not in ("passage", "query"):
            raise ValueError(f"kind must be 'passage' or 'query', got {k!r}")
    if len(texts) == 0:
        raise ValueError("pack_encode_reference: no texts")
    suffixes = {"passage": (list(template.sum_ids), template.sum_special_offsets),
                "query": (list(template.pred_ids), template.pred_special_offsets)}
    prefix = list(template.prefix_ids)
    tokens, positions, cu, special = [], [], [0], []
    for t, k in zip(texts, kinds):
        suffix, offsets = suffixes[k]
        seq = prefix + [int(x) for x in t[:max_len]] + suffix
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
