"""Token shards on disk (written by prepare, read memory-mapped by the trainer).

A prepared data directory holds

    manifest.json               format version, tokenizer identity, prompts, max_len, counts, shards
    shard-00000.text.bin        passage tokens of all the shard's examples, back to back (raw, token_dtype)
    shard-00000.sum.bin         EBAE target-id sets, back to back (raw, token_dtype)
    shard-00000.pred.bin        EBAR target-id sets (raw, token_dtype)
    shard-00000.offsets.npy     int64 (3, E+1): CSR offsets of text, sum, pred
    ...

token_dtype is uint16 when the tokenizer's ids fit (SmolLM2, LLaMA-2), else uint32. Raw
.bin files can be appended while streaming, so prepare never holds a shard in memory; the
offsets (8 bytes per example and array) are written when the shard closes. The manifest is
written last, so a directory without one is incomplete and is refused.

Reading: ``ShardedDataset`` maps the files read-only; ``epoch_order`` gives each
data-parallel rank its deterministic share of a seeded per-epoch permutation;
``ExampleStream`` iterates ``Example`` objects with an exactly resumable position.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from llara_fast.batch import Example
from llara_fast.errors import InputNotFound, UserError
from llara_fast.io.lock import file_sha256

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_KINDS = ("text", "sum", "pred")


def token_dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included) and the special ids: two
    tokenizers with the same fingerprint produce the same ids for the same text pieces."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    h = hashlib.sha256()
    h.update(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    h.update(json.dumps(sorted(int(i) for i in tokenizer.all_special_ids)).encode())
    return h.hexdigest()


# ---- writing ------------------------------------------------------------------------------------
class ShardWriter:
    """Appends batches of examples (CSR arrays) to shards of about ``shard_examples`` examples."""

    def __init__(self, out_dir: str | os.PathLike, token_dtype: np.dtype, shard_examples: int = 100_000):
        if shard_examples < 1:
            raise UserError("shard_examples must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(token_dtype)
        self.shard_examples = shard_examples
        self.shards: list[dict] = []
        self._files = None
        self._examples = 0  # in the open shard

    def _open(self):
        name = f"shard-{len(self.shards):05d}"
        self._name = name
        self._files = {k: open(self.out_dir / f"{name}.{k}.bin", "wb") for k in _KINDS}
        self._hashes = {k: hashlib.sha256() for k in _KINDS}  # computed while writing: no second read
        self._lens = {k: [] for k in _KINDS}
        self._examples = 0

    def add(self, text: np.ndarray, text_lens: np.ndarray, sum_ids: np.ndarray, sum_lens: np.ndarray,
            pred_ids: np.ndarray, pred_lens: np.ndarray, ends=None) -> None:
        """Examples: flat ids and per-example lengths for text, sum and pred. A shard closes at the
        first of ``ends`` (example counts into this call, increasing; default: the end of the call
        only) at which it holds ``shard_examples`` examples or more."""
        n = len(text_lens)
        parts = (("text", np.asarray(text), np.asarray(text_lens)), ("sum", np.asarray(sum_ids), np.asarray(sum_lens)),
                 ("pred", np.asarray(pred_ids), np.asarray(pred_lens)))
        ends = np.array([n]) if ends is None else np.asarray(ends)
        k = int(np.searchsorted(ends, self.shard_examples - self._examples))  # the first end that fills the shard
        cut = int(ends[k]) if k < len(ends) else None
        if cut is not None and cut < n:  # this shard takes the examples up to the cut, the next one the rest
            heads = [int(np.sum(lens[:cut])) for _, _, lens in parts]
            if cut:
                self.add(*(x for (_, flat, lens), h in zip(parts, heads) for x in (flat[:h], lens[:cut])), ends=[cut])
            else:  # filled by the examples before this call
                self._close_shard()
            self.add(*(x for (_, flat, lens), h in zip(parts, heads) for x in (flat[h:], lens[cut:])),
                     ends=ends[k + 1:] - cut)
            return
        if n == 0:
            if cut is not None:  # a batch without examples ends a full shard
                self._close_shard()
            return
        if self._files is None:
            self._open()
        info = np.iinfo(self.dtype)
        for kind, flat, lens in parts:
            if flat.size and (flat.min() < 0 or flat.max() > info.max):
                raise ValueError(f"token id out of range for {self.dtype}")  # a bug of the caller
            if int(np.sum(lens)) != flat.size:
                raise ValueError(f"{kind}: lengths do not add up to the flat array")
            data = flat.astype(self.dtype, copy=False).tobytes()
            self._files[kind].write(data)
            self._hashes[kind].update(data)
            self._lens[kind].append(lens.astype(np.int64, copy=False))
        self._examples += n
        if cut == n:
            self._close_shard()

    def _close_shard(self):
        for f in self._files.values():
            f.close()
        offsets = np.zeros((3, sum(len(x) for x in self._lens["text"]) + 1), dtype=np.int64)
        for r, k in enumerate(_KINDS):
            np.cumsum(np.concatenate(self._lens[k]), out=offsets[r, 1:])
        np.save(self.out_dir / f"{self._name}.offsets.npy", offsets)
        sha = {k: h.hexdigest() for k, h in self._hashes.items()}
        sha["offsets"] = file_sha256(self.out_dir / f"{self._name}.offsets.npy")
        self._examples = 0
        self.shards.append({"name": self._name, "examples": int(offsets.shape[1] - 1),
                            "text_tokens": int(offsets[0, -1]), "sum_ids": int(offsets[1, -1]),
                            "pred_ids": int(offsets[2, -1]), "sha256": sha})
        self._files = None

    def close(self) -> list[dict]:
        if self._files is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        if self._files is not None:
            for f in self._files.values():
                f.close()
            self._files = None


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> None:
    tmp = Path(out_dir) / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, Path(out_dir) / MANIFEST)


# ---- reading ------------------------------------------------------------------------------------
def _map(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if not path.is_file():
        raise InputNotFound(f"{path}: missing (the manifest lists it); prepare the data again")
    if n == 0:  # an empty file cannot be mapped
        return np.zeros(0, dtype=dtype)
    if path.stat().st_size != n * dtype.itemsize:
        raise UserError(f"{path}: {path.stat().st_size} bytes, the offsets imply {n * dtype.itemsize}")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


class ShardedDataset:
    """A prepared data directory, memory-mapped. ``sources`` are the per-shard CSR tables the
    C++ packer reads in place; ``example(i)`` builds one ``Example`` (int64 copies)."""

    def __init__(self, data_dir: str | os.PathLike, tokenizer=None):
        self.data_dir = Path(data_dir)
        mpath = self.data_dir / MANIFEST
        if not mpath.is_file():
            raise InputNotFound(f"{self.data_dir}: no {MANIFEST} (not a prepared data directory, or "
                                    "prepare did not finish); run `python -m llara_fast.data.prepare`")
        with open(mpath) as f:
            self.manifest = json.load(f)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{mpath}: format_version {self.manifest.get('format_version')}, this reader "
                             f"knows {FORMAT_VERSION}; prepare the data again")
        self.token_dtype = np.dtype(self.manifest["token_dtype"])
        self.max_len = int(self.manifest["max_len"])  # the TEXT cap
        # the released cutoff_len and the target cap (None for data prepared before they were recorded)
        self.cutoff_len = self.manifest.get("cutoff_len")
        self.target_max_len = self.manifest.get("target_max_len")
        self.sources = []
        counts = []
        self._check_listing()
        for sh in self.manifest["shards"]:
            opath = self.data_dir / f"{sh['name']}.offsets.npy"
            if not opath.is_file():
                raise InputNotFound(f"{opath}: missing (the manifest lists it); prepare the data again")
            try:
                off = np.load(opath, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise UserError(f"{opath}: cannot be read ({e}); prepare the data again") from None
            if off.ndim != 2 or off.shape != (3, sh["examples"] + 1):
                raise UserError(f"{self.data_dir / sh['name']}.offsets.npy: shape {off.shape}, the manifest "
                                 f"says {sh['examples']} examples")
            if off[:, 0].any() or (np.diff(off, axis=1) < 0).any():
                raise UserError(f"{opath}: offsets are not a non-decreasing sequence from 0 (the file is damaged); "
                                "prepare the data again")
            arrays = [_map(self.data_dir / f"{sh['name']}.{k}.bin", self.token_dtype, int(off[r, -1]))
                      for r, k in enumerate(_KINDS)]
            self.sources.append((arrays[0], off[0], arrays[1], off[1], arrays[2], off[2]))
            counts.append(sh["examples"])
        self.shard_starts = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.shard_starts[1:])
        self._text_lengths = None
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    def _check_listing(self) -> None:
        """The manifest's shards against its own counts and against the shard files on disk."""
        listed = [sh["name"] for sh in self.manifest["shards"]]
        total = sum(sh["examples"] for sh in self.manifest["shards"])
        want = (self.manifest.get("counts") or {}).get("examples")
        if want is not None and total != want:
            raise UserError(f"{self.data_dir / MANIFEST}: its shards hold {total} examples but its counts say {want}; "
                            "the manifest was edited or damaged: prepare the data again")
        on_disk = sorted(p.name[:-len(".offsets.npy")] for p in self.data_dir.glob("shard-*.offsets.npy"))
        extra = sorted(set(on_disk) - set(listed))
        if extra:
            raise UserError(f"{self.data_dir}: shard {extra[0]} is on disk but not in {MANIFEST}; the manifest was "
                            "edited or damaged: prepare the data again")

    def verify(self) -> int:
        """Check every shard file against the sha256 the manifest recorded when it was written
        (data prepared before checksums were recorded has none: nothing to check). Returns the
        bytes read."""
        read = 0
        for sh in self.manifest["shards"]:
            for kind, want in (sh.get("sha256") or {}).items():
                path = self.data_dir / f"{sh['name']}.{kind}.{'npy' if kind == 'offsets' else 'bin'}"
                read += path.stat().st_size
                if file_sha256(path) != want:
                    raise UserError(f"{path}: does not match the checksum in {MANIFEST} (changed or damaged since "
                                    "it was prepared); prepare the data again")
        return read

    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def data_id(self) -> str:
        """Identity of the prepared examples (tokenizer and shard contents), for resume checks."""
        key = json.dumps([self.fingerprint, self.max_len, self.manifest["shards"]], sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def check_tokenizer(self, tokenizer) -> None:
        got = tokenizer_fingerprint(tokenizer)
        if got != self.fingerprint:
            raise UserError(
                f"{self.data_dir}: prepared with tokenizer {self.manifest['tokenizer'].get('spec')!r} "
                f"(fingerprint {self.fingerprint[:12]}), but the model's tokenizer has fingerprint {got[:12]}; "
                "prepare the data again with this model's tokenizer")

    @property
    def text_lengths(self) -> np.ndarray:
        """(len,) int64 stored passage lengths (already cut to the manifest's max_len)."""
        if self._text_lengths is None:
            parts = [np.diff(np.asarray(s[1])) for s in self.sources]
            self._text_lengths = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._text_lengths

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global example indices -> (shard, index inside the shard)."""
        indices = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.shard_starts, indices, side="right") - 1
        return shard, indices - self.shard_starts[shard]

    def example(self, i: int) -> Example:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range (0..{len(self) - 1})")
        s, j = self.locate(np.array([i]))
        text, toff, st, soff, pt, poff = self.sources[int(s[0])]
        j = int(j[0])
        return Example(np.asarray(text[toff[j]:toff[j + 1]], dtype=np.int64),
                       np.asarray(st[soff[j]:soff[j + 1]], dtype=np.int64),
                       np.asarray(pt[poff[j]:poff[j + 1]], dtype=np.int64))


def epoch_order(num_examples: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                shuffle: bool = True) -> np.ndarray:
    """This rank's example indices for one epoch: a permutation seeded by (seed, epoch), dealt
    round-robin to the ranks; the remainder (< world_size examples) is dropped so every rank
    gets the same count."""
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} outside 0..{world_size - 1}")
    per_rank = num_examples // world_size
    if per_rank == 0:
        raise UserError(f"{num_examples} examples cannot feed {world_size} ranks")
    order = (np.random.default_rng([seed, epoch]).permutation(num_examples) if shuffle
             else np.arange(num_examples, dtype=np.int64))
    return order[rank:per_rank * world_size:world_size]


class ExampleStream:
    """Examples of a dataset in this rank's epoch order, across epochs (``epochs=None``: forever).

    ``state_dict()`` is the position of the next example to yield; loading it into a fresh
    stream over the same data continues exactly where this one stopped."""

    def __init__(self, dataset: ShardedDataset, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, epochs: int | None = None):
        self.dataset, self.seed, self.rank, self.world_size = dataset, seed, rank, world_size
        self.shuffle, self.epochs = shuffle, epochs
        self.epoch, self.position = 0, 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_order(len(self.dataset), self.seed, epoch, self.rank,
                                                    self.world_size, self.shuffle))
        return self._order_cache[1]

    def advance(self, epoch: int, position: int) -> tuple[int, int]:
        """Normalised (epoch, position): the end of an epoch is the start of the next."""
        if position >= len(self.order(epoch)):
            return epoch + 1, 0
        return epoch, position

    def __iter__(self) -> Iterator[Example]:
        while self.epochs is None or self.epoch < self.epochs:
            order = self.order(self.epoch)
            i = int(order[self.position])
            self.epoch, self.position = self.advance(self.epoch, self.position + 1)
            yield self.dataset.example(i)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "shuffle": self.shuffle, "num_examples": len(self.dataset),
                "data_id": self.dataset.data_id}

    def load_state_dict(self, state: dict) -> None:
        check_resume_state(state, {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                                   "shuffle": self.shuffle, "num_examples": len(self.dataset),
                                   "data_id": self.dataset.data_id})
        self.epoch, self.position = self.advance(int(state["epoch"]), int(state["position"]))


def check_resume_state(state: dict, expected: dict) -> None:
    """Refuse to resume a position saved for other data, another seed or another rank layout."""
    for k, v in expected.items():
        if k in state and state[k] != v:
            raise UserError(f"cannot resume: the saved data position has {k}={state[k]!r}, this run has {v!r}")
