"""The contract between packer, model and loss (DESIGN §3): a leaf that data, model, loss and
train import.

E examples are laid back to back in one flat stream of N tokens, no padding. Example e occupies

    [ main: PREFIX TEXT SUM ][ branch: PRED ]

and contributes two attention segments, main then branch. The branch's keys are that
example's PREFIX..TEXT followed by PRED itself (gathered through ``k_index``) under
bottom-right-aligned causal masking, so PRED never sees SUM. Positions run 0.. over the main
segment and restart for PRED at the position of SUM's first token.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


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
