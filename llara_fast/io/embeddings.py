"""Corpus embeddings on disk, in shards: written by ``llara_fast.encode --corpus`` (one or many
ranks), read by ``llara_fast.evaluate --embeddings`` and dense negative mining.

    DIR/embeddings.json      the manifest: model, corpus, shard size, dtype, dim (rank 0, first)
    DIR/shard-00000.npy      (n, d) float16 or float32 unit vectors, in corpus order
    DIR/shard-00000.ids      the n document ids, one per line
    DIR/shard-00000.json     {"n", "dim", "dtype", "sha256" of the .npy and the .ids, "counts"}:
                             written last, so its presence marks the shard written
    DIR/COMPLETE             every shard is done: the totals
    DIR/.lock                held by the encode writing the directory (llara_fast.io.lock)

Shard i holds the documents of the corpus lines [i * shard_size, (i + 1) * shard_size)
(physical lines, so the sharding does not depend on which lines are valid); shard i belongs to
rank i % world. A rerun with the same manifest encodes only the shards that are not done or do not
verify (a marker's checksums and shape against the files: a truncated, edited or deleted file is
encoded again, and said so); a different model, corpus, shard size, dtype or prompt is refused,
naming the field. Reading verifies every shard the same way, and refuses vectors that are not
finite or not of unit norm (within the stored dtype's rounding).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from llara_fast.errors import InputNotFound, UserError
from llara_fast.io.lock import LOCK_FILE, file_sha256

MANIFEST = "embeddings.json"
COMPLETE = "COMPLETE"
DTYPES = {"float16": np.float16, "float32": np.float32}
BLOCK_BYTES = 2**24  # the corpus file is read in blocks of 16 MiB


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def corpus_identity(path: str | os.PathLike) -> dict:
    """Size, line count and sha256 of the whole corpus file, in one streamed pass (hashing runs
    at about 1 GB/s: seconds against hours of encoding, and an edit anywhere is seen)."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFound(f"{p}: no such corpus file")
    h, lines, last = hashlib.sha256(), 0, b"\n"
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(BLOCK_BYTES), b""):
            h.update(block)
            lines += block.count(b"\n")
            last = block[-1:]
    lines += last != b"\n"  # a last line without its newline
    return {"bytes": p.stat().st_size, "lines": lines, "sha256": h.hexdigest()}


class EmbeddingShards:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ---- writing ------------------------------------------------------------------------------
    def start(self, manifest: dict, overwrite: bool = False) -> None:
        """Rank 0, before any shard: write the manifest, or check it against the one there."""
        old = self.manifest()
        if old is not None and old != manifest and not overwrite:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            what = "; ".join(f"{k}: {old.get(k)} there, {manifest.get(k)} now" for k in diff)
            raise UserError(f"{self.root}: holds embeddings of another run ({what}); pass --overwrite or "
                            "another --out")
        if old is None and self.root.exists() and any(f.name != LOCK_FILE for f in self.root.iterdir()) \
                and not overwrite:
            raise UserError(f"{self.root}: exists, is not empty and holds no {MANIFEST} (pass --overwrite)")
        if overwrite and old != manifest:
            for f in self.root.glob("*"):
                if f.name == MANIFEST or f.name == COMPLETE or f.name.startswith("shard-"):
                    f.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        if old != manifest or overwrite:
            _write_json(self.root / MANIFEST, manifest)

    def check(self, manifest: dict) -> None:
        """Every rank, after rank 0's start(): the manifest there is this run's."""
        if self.manifest() != manifest:
            raise UserError(f"{self.root / MANIFEST}: not this run's manifest (another run wrote it meanwhile?)")

    def done(self, i: int) -> bool:
        return (self.root / f"{shard_name(i)}.json").is_file()

    def forget(self, i: int) -> None:
        """Rank 0 before re-encoding a damaged shard: it is no longer done, nor is the directory."""
        for f in (self.root / f"{shard_name(i)}.json", self.root / COMPLETE):
            f.unlink(missing_ok=True)

    def damage(self, i: int) -> str | None:
        """Why shard i's files do not match its marker (None: they do); a shard without a marker is
        not written yet, not damaged."""
        name = self.root / shard_name(i)
        meta = json.loads(name.with_suffix(".json").read_text())
        if "sha256" not in meta:  # written before markers carried checksums: the shape check of read()
            return None
        for ext in ("npy", "ids"):
            f = name.with_suffix(f".{ext}")
            if not f.is_file():
                return f"{f.name} is missing"
            if file_sha256(f) != meta["sha256"][ext]:
                return f"{f.name} does not match its checksum (truncated or changed since it was written)"
        return None

    def write(self, i: int, ids: list[str], emb: np.ndarray, counts: Counter) -> None:
        """One shard, atomically: ids and vectors first, the .json marker last."""
        name = shard_name(i)
        if len(ids) != emb.shape[0]:
            raise ValueError(f"shard {i}: {len(ids)} ids but {emb.shape[0]} vectors")
        tmp = self.root / f".{name}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(d.replace("\n", " ") + "\n" for d in ids)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / f"{name}.ids")
        with open(tmp, "wb") as f:
            np.save(f, emb)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / f"{name}.npy")
        _write_json(self.root / f"{name}.json", {
            "n": len(ids), "dim": int(emb.shape[1]), "dtype": str(emb.dtype),
            "sha256": {"npy": file_sha256(self.root / f"{name}.npy"), "ids": file_sha256(self.root / f"{name}.ids")},
            "counts": dict(sorted(counts.items()))})

    def finish(self, n_shards: int) -> dict:
        """Rank 0, after every rank is done: check every shard and write COMPLETE."""
        missing = [i for i in range(n_shards) if not self.done(i)]
        if missing:
            raise UserError(f"{self.root}: shards {missing[:5]} are missing; rerun the same command to encode them")
        counts: Counter = Counter()
        n = 0
        for i in range(n_shards):
            meta = json.loads((self.root / f"{shard_name(i)}.json").read_text())
            n += meta["n"]
            counts.update(meta["counts"])
        totals = {"shards": n_shards, "documents": n, "counts": dict(sorted(counts.items()))}
        _write_json(self.root / COMPLETE, totals)
        return totals

    # ---- reading ------------------------------------------------------------------------------
    def manifest(self) -> dict | None:
        p = self.root / MANIFEST
        return json.loads(p.read_text()) if p.is_file() else None

    def read(self) -> tuple[list[str], np.ndarray, Counter]:
        """(document ids, (n, d) float32 vectors, counts) of a complete directory; a duplicate id
        keeps its first occurrence (counted as corpus_duplicate_id)."""
        manifest = self.manifest()
        if manifest is None:
            raise InputNotFound(f"{self.root / MANIFEST}: missing (not a directory of llara_fast.encode --corpus)")
        if not (self.root / COMPLETE).is_file():
            raise UserError(f"{self.root}: not complete (no {COMPLETE}); rerun the encode command to finish it")
        totals = json.loads((self.root / COMPLETE).read_text())
        ids, parts, counts = [], [], Counter(totals["counts"])
        for i in range(totals["shards"]):
            name = self.root / shard_name(i)
            why = self.damage(i) if self.done(i) else f"{name.name}.json is missing"
            if why is not None:
                raise UserError(f"{self.root}: shard {i} is damaged ({why}); rerun the encode command that made it "
                                "to encode that shard again")
            n = json.loads(name.with_suffix(".json").read_text())["n"]
            try:
                emb = np.load(name.with_suffix(".npy"))
            except (OSError, ValueError) as e:
                raise UserError(f"{name}.npy: cannot be read ({e}); rerun the encode command to repair it") from None
            got = name.with_suffix(".ids").read_text(encoding="utf-8").splitlines()
            if emb.shape != (n, manifest["dim"]) or len(got) != n:
                raise UserError(f"{name}.npy: holds {emb.shape} vectors and {len(got)} ids, its .json says "
                                f"{n} x {manifest['dim']}")
            check_unit_vectors(emb, f"{name}.npy")
            ids += got
            parts.append(emb)
        emb = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, manifest["dim"]), np.float32)
        first: dict[str, int] = {}
        for j, d in enumerate(ids):
            first.setdefault(d, j)
        if len(first) < len(ids):
            counts["corpus_duplicate_id"] += len(ids) - len(first)
            keep = sorted(first.values())
            ids, emb = [ids[j] for j in keep], emb[keep]
        return ids, emb, +counts


def check_unit_vectors(emb: np.ndarray, where: str) -> None:
    """Refuse non-finite vectors and vectors whose norm is not 1 within the rounding of their
    stored dtype (each component rounded once: the norm moves by at most its unit roundoff; the
    bound below is 8 of those, plus the float32 normalisation's own)."""
    x = emb.astype(np.float64)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        j = int(np.flatnonzero(~finite)[0])
        raise UserError(f"{where}: vector {j} holds NaN/inf ({int((~finite).sum())} such); rerun the encode command")
    if len(x):
        tol = 8 * float(np.finfo(emb.dtype).eps) + 8 * float(np.finfo(np.float32).eps)
        off = np.abs(np.linalg.norm(x, axis=1) - 1.0)
        if off.max() > tol:
            j = int(off.argmax())
            raise UserError(f"{where}: vector {j} has norm {np.linalg.norm(x[j]):.6g}, not 1 (the format holds unit "
                            "vectors); the file was changed or damaged: rerun the encode command")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
