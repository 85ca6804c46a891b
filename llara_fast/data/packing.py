"""PackedBatch (DESIGN §3) and the pure-Python reference packer.

E examples are laid back to back in one flat stream, no padding. Example e occupies

    [ main: PREFIX TEXT SUM ][ branch: PRED ]

and contributes two attention segments, main then branch. The branch's keys are that
example's PREFIX..TEXT followed by PRED itself (gathered through ``k_index``) under
bottom-right-aligned causal masking, so PRED never sees SUM. Positions run 0.. over the
main segment and restart for PRED at the position of SUM's first token.

``max_len`` caps the TEXT tokens of an example (the reference's passage cutoff); the
fixed prompt pieces come on top of it.

Two packers of one contract: ``pack_reference`` (plain Python, the specification) and the
C++ packer in csrc/packer.cpp (multi-threaded, reads prepared shards in place), wrapped by
``NativePacker`` / ``pack`` / ``pack_greedy`` below, which fall back to the reference with
one clear message when the extension is missing.
"""
from __future__ import annotations

import warnings
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


# ---- the C++ packer ---------------------------------------------------------------------------
_FALLBACK_SAID = False


def native_packer_available() -> bool:
    import llara_fast

    return llara_fast._C is not None and hasattr(llara_fast._C, "Packer")


def _say_fallback() -> None:
    global _FALLBACK_SAID
    if not _FALLBACK_SAID:
        _FALLBACK_SAID = True
        warnings.warn("llara_fast._C (the C++ packer) is not built: packing with the pure-Python reference "
                      "packer, which is much slower. Build it with `pip install -e .` (or ./scripts/setup.sh).",
                      RuntimeWarning, stacklevel=3)


def _use_native(native: bool | None) -> bool:
    """native=None: the C++ packer when built (else the reference, said once); True: require it."""
    if native is None:
        if native_packer_available():
            return True
        _say_fallback()
        return False
    if native and not native_packer_available():
        raise RuntimeError("llara_fast._C (the C++ packer) is not built: run `pip install -e .`")
    return bool(native)


Source = tuple  # (text, text_offsets, sum_ids, sum_offsets, pred_ids, pred_offsets): one CSR example table


def examples_to_source(examples: Sequence[Example]) -> Source:
    """The CSR table of a list of examples (what prepare's shards hold on disk)."""
    def csr(arrays):
        off = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=off[1:])
        flat = np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays]) if arrays else np.zeros(0, np.int64)
        return flat, off

    text, text_off = csr([e.text_ids for e in examples])
    st, st_off = csr([e.sum_targets for e in examples])
    pt, pt_off = csr([e.pred_targets for e in examples])
    return text, text_off, st, st_off, pt, pt_off


class NativePacker:
    """The C++ packer for one template and max_len: references into CSR sources -> PackedBatches."""

    def __init__(self, template: Template, max_len: int, n_threads: int = 0):
        import llara_fast

        if not native_packer_available():
            raise RuntimeError("llara_fast._C (the C++ packer) is not built: run `pip install -e .`")
        self.template, self.max_len = template, max_len
        self.fixed_tokens = len(template.prefix_ids) + len(template.sum_ids) + len(template.pred_ids)
        self._packer = llara_fast._C.Packer(list(template.prefix_ids), list(template.sum_ids),
                                            list(template.pred_ids), list(template.sum_special_offsets),
                                            list(template.pred_special_offsets), max_len, n_threads)

    def token_counts(self, text_lengths: np.ndarray) -> np.ndarray:
        """Stream tokens of each example (``example_num_tokens`` vectorised)."""
        return self.fixed_tokens + np.minimum(np.asarray(text_lengths, dtype=np.int64), self.max_len)

    def pack_arrays(self, sources: Sequence[Source], ex_source: np.ndarray, ex_index: np.ndarray,
                    group_offsets: np.ndarray) -> list[dict]:
        return self._packer.pack(list(sources), np.ascontiguousarray(ex_source, dtype=np.int64),
                                 np.ascontiguousarray(ex_index, dtype=np.int64),
                                 np.ascontiguousarray(group_offsets, dtype=np.int64))

    def pack(self, sources: Sequence[Source], ex_source: np.ndarray, ex_index: np.ndarray,
             group_offsets: np.ndarray) -> list[PackedBatch]:
        """Group g packs the references group_offsets[g]..group_offsets[g+1] (zero-copy into torch)."""
        return [PackedBatch.from_numpy(d) for d in self.pack_arrays(sources, ex_source, ex_index, group_offsets)]


def greedy_offsets(token_counts: np.ndarray, token_budget: int, max_groups: int = 0) -> np.ndarray:
    """``greedy_groups`` as boundaries (int64, from 0), in C++ when built. Stops after max_groups
    complete groups (0: no limit); running out of examples closes the last group, so
    offsets[-1] == len(token_counts) says the end was reached."""
    counts = np.ascontiguousarray(token_counts, dtype=np.int64)
    if native_packer_available():
        import llara_fast

        return llara_fast._C.greedy_groups(counts, int(token_budget), int(max_groups))
    off = [0]
    for g in greedy_groups(counts.tolist(), token_budget):
        off.append(off[-1] + len(g))
        if max_groups and len(off) - 1 == max_groups and off[-1] < len(counts):
            break
    return np.asarray(off, dtype=np.int64)


def pack(examples: Sequence[Example], template: Template, max_len: int, n_threads: int = 0,
         native: bool | None = None) -> PackedBatch:
    """One PackedBatch of ``examples`` (C++ when built, else ``pack_reference``)."""
    if not _use_native(native):
        return pack_reference(examples, template, max_len)
    if len(examples) == 0:
        raise ValueError("pack: no examples")
    packer = NativePacker(template, max_len, n_threads)
    n = len(examples)
    return packer.pack([examples_to_source(examples)], np.zeros(n, np.int64), np.arange(n, dtype=np.int64),
                       np.array([0, n], dtype=np.int64))[0]


def pack_greedy(examples: Sequence[Example], template: Template, max_len: int, token_budget: int,
                n_threads: int = 0, native: bool | None = None) -> list[PackedBatch]:
    """``pack_greedy_reference`` through the C++ packer (all groups in one multi-threaded call)."""
    if not _use_native(native):
        return pack_greedy_reference(examples, template, max_len, token_budget)
    if len(examples) == 0:
        return []
    packer = NativePacker(template, max_len, n_threads)
    n = len(examples)
    offsets = greedy_offsets(packer.token_counts([len(e.text_ids) for e in examples]), token_budget)
    return packer.pack([examples_to_source(examples)], np.zeros(n, np.int64), np.arange(n, dtype=np.int64), offsets)
