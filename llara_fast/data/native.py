"""The C++ packer (csrc/packer.cpp, pybind11): references into CSR example tables ->
PackedBatches, multi-threaded, output in numpy buffers wrapped zero-copy by torch. Same contract
as llara_fast.data.packing.pack_reference, which it falls back to (said once) when the
extension is not built."""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

import llara_fast
from llara_fast.batch import Example, PackedBatch
from llara_fast.data.packing import greedy_groups, pack_greedy_reference, pack_reference
from llara_fast.templates import Template

_FALLBACK_SAID = False


def native_packer_available() -> bool:
    return llara_fast._C is not None and hasattr(llara_fast._C, "Packer")


def _say_fallback() -> None:
    global _FALLBACK_SAID
    if not _FALLBACK_SAID:
        _FALLBACK_SAID = True
        warnings.warn("llara_fast._C (the C++ packer) is not built: packing with the pure-Python reference "
                      "packer, which is much slower. Build it with `pip install -e .` (or ./scripts/setup.sh).",
                      RuntimeWarning, stacklevel=3)


def use_native(native: bool | None) -> bool:
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
    if not use_native(native):
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
    if not use_native(native):
        return pack_greedy_reference(examples, template, max_len, token_budget)
    if len(examples) == 0:
        return []
    packer = NativePacker(template, max_len, n_threads)
    n = len(examples)
    offsets = greedy_offsets(packer.token_counts([len(e.text_ids) for e in examples]), token_budget)
    return packer.pack([examples_to_source(examples)], np.zeros(n, np.int64), np.arange(n, dtype=np.int64), offsets)
