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

import hashlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from llara_fast.batch import PackedBatch
from llara_fast.config import opt
from llara_fast.data.native import NativePacker, greedy_offsets, use_native
from llara_fast.data.packing import pack_encode_reference, pack_reference
from llara_fast.data.pairs import FinetuneDataConfig, load_records, tokenize_records
from llara_fast.data.prepare import FORMATS, PrepareOptions, cached_prepare_dir, prepare
from llara_fast.data.shards import MANIFEST, ExampleStream, ShardedDataset, check_resume_state, epoch_order
from llara_fast.errors import ConfigError, UserError
from llara_fast.io.hf import resolve_source
from llara_fast.templates import DEFAULT_MAX_LEN, Lengths, Template


class _End:
    pass


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


@dataclass(frozen=True)
class LoaderOptions:
    seed: int = 0                   # shuffling seed
    rank: int = 0                   # example-level sharding: this rank of world_size
    world_size: int = 1
    shuffle: bool = True
    epochs: int | None = None       # None: forever
    prefetch: int = 4               # batches queued ahead
    groups_per_call: int = 4        # micro-batches per call of the C++ packer
    n_threads: int = 0              # C++ packer threads (0: its default)
    pin_memory: bool | None = None  # None: when CUDA is available
    native: bool | None = None      # None: the C++ packer when built; True: require it; False: the reference
    dp_rank: int = 0                # micro-batch-level dealing: this rank of dp_world
    dp_world: int = 1


class PackedLoader:
    """Iterator of PackedBatch for one data-parallel rank (``epochs=None``: forever).

    Attributes worth logging: ``wait_seconds`` (time __next__ blocked on the producer; ~0 when
    packing keeps up), ``batches``, ``examples``."""

    def __init__(self, dataset: ShardedDataset, template: Template, max_len: int, token_budget: int,
                 opts: LoaderOptions = LoaderOptions()):
        prefetch, groups_per_call, dp_rank, dp_world = opts.prefetch, opts.groups_per_call, opts.dp_rank, opts.dp_world
        if max_len > dataset.max_len:
            raise UserError(f"max_len {max_len} exceeds the max_len {dataset.max_len} the data was prepared "
                             "with (passages were already cut there); prepare again or lower max_len")
        if prefetch < 1 or groups_per_call < 1:
            raise UserError("prefetch and groups_per_call must be >= 1")
        self.dataset, self.template, self.max_len, self.token_budget = dataset, template, max_len, token_budget
        self.prefetch, self.groups_per_call = prefetch, groups_per_call
        if not 0 <= dp_rank < dp_world:
            raise UserError(f"dp_rank {dp_rank} outside 0..{dp_world - 1}")
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self._group = 0  # global index of the next micro-batch (group) in the stream
        self.pin_memory = torch.cuda.is_available() if opts.pin_memory is None else opts.pin_memory
        self._stream = ExampleStream(dataset, opts.seed, opts.rank, opts.world_size, opts.shuffle,
                                     opts.epochs)  # order + position
        self._native = use_native(opts.native)
        self._packer = NativePacker(template, max_len, opts.n_threads) if self._native else None
        self.fixed_tokens = len(template.prefix_ids) + len(template.sum_ids) + len(template.pred_ids)
        if self.fixed_tokens > token_budget:
            raise UserError(f"token budget {token_budget} is below the {self.fixed_tokens} prompt tokens of one example")
        longest = self.fixed_tokens + min(int(dataset.text_lengths.max(initial=0)), max_len)
        if longest > token_budget:  # before any work (and before a run writes its config.toml)
            raise ConfigError(f"token budget {token_budget} (data.token_budget) is below the longest example of "
                              f"{dataset.data_dir} "
                              f"({longest} tokens: {longest - self.fixed_tokens} of text + {self.fixed_tokens} of "
                              f"prompt); raise it to at least {longest} or lower the text cap")
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

    def epoch_micro_batches(self, epoch: int) -> int:
        """Micro-batches of epoch ``epoch`` over all dp ranks: the greedy groups of its whole order
        (the producer's windows group exactly so: a group never crosses an epoch)."""
        st = self._stream
        order = epoch_order(len(self.dataset), st.seed, epoch, st.rank, st.world_size, st.shuffle)
        counts = self.fixed_tokens + np.minimum(self.dataset.text_lengths[order], self.max_len)
        return len(greedy_offsets(counts, self.token_budget)) - 1

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


@dataclass
class PretrainDataConfig:
    """The [data] section of llara_fast.pretrain."""
    dir: str = opt("", "a prepared data directory; empty: prepare `format` on the fly")
    format: str = opt("wiki-sample", "for on-the-fly prepare: wiki-sample, llara-jsonl, text", FORMATS)
    input: str = opt("", "for on-the-fly prepare of llara-jsonl / text")
    limit: int = opt(-1, "for on-the-fly prepare: first N records (0: all; -1: 2000 on CPU, all on GPU)")
    max_len: int = opt(DEFAULT_MAX_LEN, "passage (TEXT) tokens per example (targets: max_len + the prompt tokens)")
    cutoff_len: int = opt(0, "or the released code's cutoff_len, the whole sequence (> 0 overrides max_len)")
    remove_stopwords: bool = opt(False, "for on-the-fly prepare: the released remove_stop_words rule on the target "
                                 "texts (prepare --remove-stopwords)")
    token_budget: int = opt(0, "tokens per micro-batch (0: 1024 on CPU, 16384 on GPU)")
    grad_accum: int = opt(1, "micro-batches per rank per step")
    seed: int = opt(0, "data order")
    verify: bool = opt(False, "check every shard file against the manifest's sha256 before training (done anyway "
                       "on a prepared directory's first use)")


VERIFIED = ".verified"  # in a prepared directory: the sha256 of the manifest whose checksums held


def verify_dataset(dataset: ShardedDataset, force: bool = False) -> None:
    """Every shard file against the manifest's checksums, on a directory's first use (a marker
    records the manifest it was done for) and whenever ``force`` (data.verify) is set."""
    mpath = dataset.data_dir / MANIFEST
    stamp = hashlib.sha256(mpath.read_bytes()).hexdigest()
    marker = dataset.data_dir / VERIFIED
    if not force and marker.is_file() and marker.read_text().strip() == stamp:
        return
    t0 = time.perf_counter()
    n = dataset.verify()
    print(f"data: {dataset.data_dir}: {n / 1e6:.1f} MB checked against the manifest's checksums in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    try:
        tmp = marker.with_name(f"{VERIFIED}.tmp{os.getpid()}")
        tmp.write_text(stamp + "\n")
        os.replace(tmp, marker)
    except OSError:  # a read-only data directory: verified again next time
        pass


def llara_loader(cfg, tokenizer, template: Template, rank: int, world: int) -> PackedLoader:
    """The PackedLoader of a pretraining config (its data, model and run sections): data.dir, or
    data.format prepared once (rank 0; the others wait) into a cache next to the runs. Refuses data
    of another tokenizer or, when data.cutoff_len is set, of another cutoff."""
    d, m = cfg.data, cfg.model
    lengths = Lengths.resolve(template, cutoff_len=d.cutoff_len or None, max_len=None if d.cutoff_len else d.max_len)
    if d.dir:
        data_dir = Path(d.dir)
    else:
        src = None if m.random_init else resolve_source(m.name, m.revision)
        tok_spec = m.tokenizer or (str(src) if src is not None else "smollm2-135m")
        box = [None]
        if rank == 0:  # the cache is named by the input's content; rank 0 decides, the others follow
            data_dir = cached_prepare_dir(Path(cfg.run.out_dir).parent / "data", d, tok_spec)
            if (data_dir / MANIFEST).is_file():
                print(f"data: reusing {data_dir} (prepared earlier from the same input content and settings)",
                      flush=True)
            else:
                print(f"data: preparing {d.input or d.format} into {data_dir}", flush=True)
                prepare(d.input or None, d.format, tok_spec, None if d.cutoff_len else d.max_len, data_dir,
                        PrepareOptions(cutoff_len=d.cutoff_len or None, limit=d.limit or None,
                                       remove_stopwords=d.remove_stopwords, overwrite=True))
            box = [str(data_dir)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        data_dir = Path(box[0])
    dataset = ShardedDataset(data_dir, tokenizer=tokenizer)  # refuses data of another tokenizer
    verify_dataset(dataset, force=d.verify)
    if d.cutoff_len and dataset.cutoff_len != d.cutoff_len:
        raise UserError(f"{data_dir}: prepared with cutoff_len {dataset.cutoff_len}, but data.cutoff_len is "
                        f"{d.cutoff_len} (the targets were cut at the former); prepare the data again")
    return PackedLoader(dataset, template, min(lengths.text, dataset.max_len), d.token_budget,
                        LoaderOptions(seed=d.seed, dp_rank=rank, dp_world=world))


# ---- contrastive fine-tuning ------------------------------------------------------------------
@dataclass(frozen=True)
class GroupSpec:
    queries: int         # queries per micro-batch and rank
    negatives: int       # hard negatives per query (group = 1 + negatives)
    grad_accum: int = 1  # micro-batches per rank per step
    seed: int = 0


@dataclass
class ContrastiveBatch:
    batch: PackedBatch               # n_queries queries, then n_queries * group passages
    special: torch.Tensor            # (n_queries * (1 + group), K) positions averaged per text
    n_queries: int
    group: int


class ContrastiveLoader:
    """Deterministic micro-batches of (query, positive, negatives) groups, dealt to ranks.

    The stream of query slots is the concatenation of per-epoch permutations; step s takes the
    next ``queries * world * grad_accum`` slots, and micro-batch i of rank r is slot block
    i * world + r (as PackedLoader deals), so the global step does not depend on the number of
    ranks. The positive and negatives of a slot are drawn from a generator seeded by
    (seed, slot), so resuming at a slot reproduces the run exactly."""

    def __init__(self, records: list[tuple[list[int], list[list[int]], list[list[int]]]], template: Template,
                 groups: GroupSpec, dp_rank: int = 0, dp_world: int = 1):
        if not records:
            raise UserError("no usable training records")
        self.records, self.template = records, template
        self.queries, self.negatives, self.grad_accum = groups.queries, groups.negatives, groups.grad_accum
        self.seed, self.dp_rank, self.dp_world = groups.seed, dp_rank, dp_world
        self.slot = 0  # next global query slot
        self._data_id = None
        self._perm_epoch, self._perm = -1, None
        # Passages to draw from when a query has fewer negatives than asked: every positive.
        self.pool = [(i, j) for i, (_, pos, _) in enumerate(records) for j in range(len(pos))]

    def _record(self, slot: int) -> int:
        n = len(self.records)
        epoch = slot // n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[slot % n])

    def _group(self, slot: int) -> tuple[list[int], list[list[int]]]:
        i = self._record(slot)
        q, pos, neg = self.records[i]
        rng = np.random.default_rng([self.seed, slot, 1])
        passages = [pos[int(rng.integers(len(pos)))]]
        k = self.negatives
        if len(neg) >= k:
            passages += [neg[int(j)] for j in rng.choice(len(neg), k, replace=False)]
        else:
            passages += list(neg)
            if len(self.records) < 2:
                raise ValueError(f"a query has {len(neg)} negatives, data.negatives asks for {k}, and there is no "
                                 "other query whose positives could stand in; lower data.negatives")
            while len(passages) < 1 + k:  # top up with other queries' positives
                r, j = self.pool[int(rng.integers(len(self.pool)))]
                if r != i:
                    passages.append(self.records[r][1][j])
        return q, passages

    def micro_batch(self, first_slot: int) -> ContrastiveBatch:
        qs, ps = [], []
        for s in range(first_slot, first_slot + self.queries):
            q, p = self._group(s)
            qs.append(q)
            ps += p
        kinds = ["query"] * len(qs) + ["passage"] * len(ps)
        batch, special = pack_encode_reference(qs + ps, self.template, kinds, max_len=1 << 30)
        return ContrastiveBatch(batch, special, len(qs), 1 + self.negatives)

    def __next__(self) -> list[ContrastiveBatch]:
        per_block = self.queries
        out = []
        for i in range(self.grad_accum):
            block = i * self.dp_world + self.dp_rank
            out.append(self.micro_batch(self.slot + block * per_block))
        self.slot += self.slots_per_step
        return out

    @property
    def slots_per_step(self) -> int:
        """Query slots one optimizer step takes (all ranks; an epoch holds one slot per record)."""
        return self.queries * self.dp_world * self.grad_accum

    @property
    def data_id(self) -> str:
        """Identity of the training records (their token ids), for resume checks."""
        if self._data_id is None:
            self._data_id = hashlib.sha256(json.dumps(self.records).encode()).hexdigest()[:16]
        return self._data_id

    def state_dict(self) -> dict:
        return {"slot": self.slot, "seed": self.seed, "records": len(self.records), "data_id": self.data_id}

    def load_state_dict(self, state: dict):
        same = (state["records"], state["seed"], state.get("data_id", self.data_id)) == (len(self.records), self.seed,
                                                                                      self.data_id)
        if not same:
            raise UserError(f"the checkpoint's data ({state['records']} records, seed {state['seed']}, id "
                            f"{state.get('data_id')}) is not this run's ({len(self.records)} records, seed {self.seed}, "
                            f"id {self.data_id})")
        self.slot = state["slot"]


def contrastive_loader(d: FinetuneDataConfig, tokenizer, template: Template, rank: int,
                       world: int) -> tuple[ContrastiveLoader, str]:
    """The ContrastiveLoader of a fine-tuning data section, and a line saying what it holds."""
    if d.queries < 1 or d.negatives < 0 or d.grad_accum < 1:
        raise ConfigError("data.queries and data.grad_accum must be >= 1, data.negatives >= 0")
    recs, counts, src = load_records(d)
    records = tokenize_records(recs, tokenizer, d.query_max_len, d.passage_max_len)
    about = f"data: {len(records)} training queries from {src}" + (
        f"; counts: {dict(sorted((k, v) for k, v in counts.items() if v))}" if counts else "")
    loader = ContrastiveLoader(records, template, GroupSpec(d.queries, d.negatives, d.grad_accum, d.seed), rank, world)
    return loader, about
