"""PackedLoader: prepared shards -> PackedBatches, packed in a background thread.

The producer thread walks this rank's epoch order (``shards.epoch_order``), groups examples
greedily under the token budget (``greedy_groups`` semantics; a group never crosses an epoch)
and packs ``groups_per_call`` groups per call of the C++ packer, which reads the
memory-mapped shards in place and releases the GIL while it fills the buffers. Batches go
through a bounded queue (``prefetch``), pinned first when CUDA is available, so the trainer
finds the next batch ready while the GPU runs the current step.

Position: ``state_dict()`` is the position right after the last batch *handed to the
trainer* (not the producer's prefetch position). Greedy grouping restarts at that point
exactly as in an uninterrupted run, so a loader restored from it yields the same batches.

Data parallelism, two ways:
- ``rank``/``world_size`` deal *examples* round-robin (each rank packs its own share);
- ``dp_rank``/``dp_world`` deal *micro-batches*: every rank walks the same global order and
  the same greedy grouping, and takes groups dp_rank, dp_rank + dp_world, ... So the global
  batch of a step (dp_world ranks × accumulation micro-batches) is the same micro-batches
  whatever the number of ranks — what the trainer uses, so that 1 and N processes train alike.
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np
import torch

from llara_fast.data.packing import (NativePacker, PackedBatch, _use_native, greedy_offsets, pack_reference)
from llara_fast.data.shards import ExampleStream, ShardedDataset, check_resume_state
from llara_fast.data.templates import Template


class _End:
    pass


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class PackedLoader:
    """Iterator of PackedBatch for one data-parallel rank (``epochs=None``: forever).

    Attributes worth logging: ``wait_seconds`` (time __next__ blocked on the producer; ~0 when
    packing keeps up), ``batches``, ``examples``."""

    def __init__(self, dataset: ShardedDataset, template: Template, max_len: int, token_budget: int, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 epochs: int | None = None, prefetch: int = 4, groups_per_call: int = 4, n_threads: int = 0,
                 pin_memory: bool | None = None, native: bool | None = None, dp_rank: int = 0, dp_world: int = 1):
        if max_len > dataset.max_len:
            raise ValueError(f"max_len {max_len} exceeds the max_len {dataset.max_len} the data was prepared "
                             "with (passages were already cut there); prepare again or lower max_len")
        if prefetch < 1 or groups_per_call < 1:
            raise ValueError("prefetch and groups_per_call must be >= 1")
        self.dataset, self.template, self.max_len, self.token_budget = dataset, template, max_len, token_budget
        self.prefetch, self.groups_per_call = prefetch, groups_per_call
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_world - 1}")
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self._group = 0  # global index of the next micro-batch (group) in the stream
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._stream = ExampleStream(dataset, seed, rank, world_size, shuffle, epochs)  # order + position
        self._native = _use_native(native)
        self._packer = NativePacker(template, max_len, n_threads) if self._native else None
        self.fixed_tokens = len(template.prefix_ids) + len(template.sum_ids) + len(template.pred_ids)
        if self.fixed_tokens > token_budget:
            raise ValueError(f"token budget {token_budget} is below the {self.fixed_tokens} prompt tokens of one example")
        self._window = groups_per_call * (token_budget // self.fixed_tokens + 1)
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self.wait_seconds = 0.0
        self.batches = 0
        self.examples = 0

    # ---- the trainer's side ------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> PackedBatch:
        if self._thread is None:
            self._start()
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - t0
        if isinstance(item, _End):
            self._join()
            raise StopIteration
        if isinstance(item, _Failed):
            self._join()
            raise item.exc
        batch, (epoch, position), group = item
        self._stream.epoch, self._stream.position = epoch, position
        self._group = group
        self.batches += 1
        self.examples += batch.num_examples
        return batch

    def state_dict(self) -> dict:
        """Position after the last batch handed out, plus what it is only valid for."""
        sd = self._stream.state_dict()
        sd.update(token_budget=self.token_budget, max_len=self.max_len, group=self._group,
                  dp_rank=self.dp_rank, dp_world=self.dp_world)
        return sd

    def load_state_dict(self, state: dict) -> None:
        check_resume_state(state, {"token_budget": self.token_budget, "max_len": self.max_len,
                                   "dp_rank": self.dp_rank, "dp_world": self.dp_world})
        self.close()
        self._stream.load_state_dict(state)
        self._group = int(state.get("group", 0))

    def close(self) -> None:
        """Stop the producer (a later __next__ restarts it from the current position)."""
        if self._thread is not None:
            self._stop.set()
            self._join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- the producer ------------------------------------------------------------------------------
    def _start(self):
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        start = (self._stream.epoch, self._stream.position, self._group)
        self._thread = threading.Thread(target=self._produce, args=start, name="llara-packer", daemon=True)
        self._thread.start()

    def _join(self):
        while self._thread is not None and self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.01)
        self._thread = None

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self, epoch: int, pos: int, group: int) -> None:
        try:
            stream = self._stream
            while not self._stop.is_set():
                if stream.epochs is not None and epoch >= stream.epochs:
                    self._put(_End())
                    return
                order = stream.order(epoch)
                window = order[pos:pos + self._window]
                at_end = pos + len(window) == len(order)
                counts = self.fixed_tokens + np.minimum(self.dataset.text_lengths[window], self.max_len)
                offs = greedy_offsets(counts, self.token_budget, self.groups_per_call)
                if offs[-1] == len(window) and not at_end:  # the last group might grow: keep it for later
                    if len(offs) == 2:
                        self._window *= 2
                        continue
                    offs = offs[:-1]
                mine = [g for g in range(len(offs) - 1) if (group + g) % self.dp_world == self.dp_rank]
                if mine:
                    sel = np.concatenate([window[offs[g]:offs[g + 1]] for g in mine])
                    sizes = np.array([offs[g + 1] - offs[g] for g in mine], dtype=np.int64)
                    sel_offs = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
                    for g, batch in zip(mine, self._pack(sel, sel_offs)):
                        if self.pin_memory:
                            batch = batch.pin_memory()
                        if not self._put((batch, stream.advance(epoch, pos + int(offs[g + 1])), group + g + 1)):
                            return
                group += len(offs) - 1
                epoch, pos = stream.advance(epoch, pos + int(offs[-1]))
        except BaseException as e:  # handed to the trainer's thread
            self._put(_Failed(e))

    def _pack(self, indices: np.ndarray, offs: np.ndarray) -> list[PackedBatch]:
        if self._native:
            shard, local = self.dataset.locate(indices)
            return self._packer.pack(self.dataset.sources, shard, local, offs)
        exs = [self.dataset.example(int(i)) for i in indices]
        return [pack_reference(exs[a:b], self.template, self.max_len) for a, b in zip(offs[:-1], offs[1:])]
