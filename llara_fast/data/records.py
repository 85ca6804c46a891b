"""Input records of ``prepare``: reading them (JSONL lines, .txt documents, wiki entries),
decoding them, and the bad-record rule.

A record is a JSONL line, a .txt document (blank-line separated), or a wiki entry. Bad records
are skipped and counted by reason (``BAD_REASONS``, a reason names the field and the type it
needs): invalid_utf8, invalid_json, missing_field:F (F absent or null), bad_type:F:str (F not a
string), bad_type:record:object (a JSON value that is not an object), empty_text (blank passage),
tokenizer_error. Blank JSONL lines are not records (counted as blank_lines). When bad records
exceed ``max_bad_fraction`` of the records seen (checked from 1,000 records on, and at the end),
``check_bad_fraction`` stops the run with an error naming the file and line.
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from llara_fast.data.sources import wiki_sample_path
from llara_fast.data.text import is_utf8
from llara_fast.errors import UserError

BAD_REASONS = ("invalid_utf8", "invalid_json", "missing_field", "bad_type", "empty_text", "tokenizer_error")
MIN_RECORDS_FOR_EARLY_STOP = 1000
LLARA_FIELDS = ("input", "output_summarize", "output_predict")


class PrepareError(UserError):
    pass


def is_bad(reason: str) -> bool:
    """A counter key that is a bad-record reason (its kind, before any ':field:type', in BAD_REASONS)."""
    return reason.split(":", 1)[0] in BAD_REASONS


def field_problem(obj, names) -> str | None:
    """The first of ``names`` that a decoded JSON record lacks (missing_field:F) or holds as
    something other than a string (bad_type:F:str); bad_type:record:object for a non-object."""
    if not isinstance(obj, dict):
        return "bad_type:record:object"
    for k in names:
        if obj.get(k) is None:
            return f"missing_field:{k}"
        if not isinstance(obj[k], str):
            return f"bad_type:{k}:str"
    return None


@dataclass
class Record:
    loc: str | int        # "path#title" (wiki), or the line's index in its block (resolved by the driver)
    data: bytes | str | None  # raw JSON line / .txt document bytes, or the decoded wiki text
    kind: str             # "json", "txt" or "wiki"


@dataclass(frozen=True)
class Block:
    """A piece of the input that one worker reads, parses and tokenises: a line-aligned byte range
    [start, end) of a file (a .txt file's cut after a blank line, so no document straddles two
    blocks), or a list of wiki records (the driver reads that small JSON file)."""
    path: str | None = None
    start: int = 0
    end: int = 0
    txt: bool = False
    records: list | None = None
    error: str | None = None         # the file could not be read: raised when this block's turn comes
    max_records: int | None = None   # read at most this many records (then only look for one more)


def input_files(path: Path, fmt: str) -> list[Path]:
    suffixes = {"llara-jsonl": (".jsonl", ".json"), "text": (".jsonl", ".json", ".txt")}[fmt]
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
        if not files:
            raise PrepareError(f"{path}: no {'/'.join(suffixes)} files for format {fmt}")
        return files
    if path.exists():
        raise PrepareError(f"{path}: not a regular file or directory (a FIFO, socket or device)")
    raise PrepareError(f"{path}: no such file or directory")


BOM = b"\xef\xbb\xbf"


def _cannot_read(fp, e: OSError) -> str:
    return f"{fp}: cannot read it ({e.strerror or e})"


def plan_blocks(path: Path | None, fmt: str, block_bytes: int, batch_records: int,
                limit: int | None) -> Iterator[Block]:
    """The input as blocks, in input order. Files are cut at the first line start at or after
    every ``block_bytes`` (.txt files: after the next blank line); the driver only seeks and reads
    a line or a few per cut. wiki-sample: lists of ``batch_records`` entries, the first ``limit``."""
    if fmt == "wiki-sample":
        for recs in batches(iter_wiki_records(path), batch_records, limit):
            yield Block(records=recs)
        return
    for fp in input_files(path, fmt):
        yield from _file_blocks(fp, fp.suffix == ".txt", block_bytes)


def _file_blocks(fp: Path, txt: bool, block_bytes: int) -> Iterator[Block]:
    start = 0
    try:
        with open(fp, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            while start < size:
                end = size
                if start + block_bytes < size:
                    f.seek(start + block_bytes - 1)
                    f.readline()  # to the next line start
                    while txt:    # a .txt document ends at a blank line
                        line = f.readline()
                        if not line or not line.strip():
                            break
                    end = min(f.tell(), size)
                yield Block(path=str(fp), start=start, end=end, txt=txt)
                start = end
    except OSError as e:
        yield Block(path=str(fp), start=start, error=_cannot_read(fp, e))


def read_block(block: Block) -> bytes:
    """A file block's bytes; an unreadable file is one PrepareError naming it."""
    if block.error is not None:
        raise PrepareError(block.error)
    try:
        with open(block.path, "rb") as f:
            f.seek(block.start)
            return f.read(block.end - block.start)
    except OSError as e:
        raise PrepareError(_cannot_read(block.path, e)) from None


def block_records(block: Block, data: bytes | None, counters: Counter) -> Iterator[Record]:
    """The records of a block (its bytes from read_block), their locs the line index in the block;
    a file's leading UTF-8 byte-order mark is dropped."""
    if block.records is not None:
        yield from block.records
        return
    lines = enumerate(io.BytesIO(data))  # split at b"\n" only, as iterating the file does
    if block.start == 0:
        lines = ((i, raw.removeprefix(BOM) if i == 0 else raw) for i, raw in lines)
    if block.txt:
        yield from _txt_records(lines)
        return
    for i, raw in lines:
        if not raw.strip():
            counters["blank_lines"] += 1
            continue
        yield Record(i, raw, "json")


def _txt_records(lines: Iterator[tuple[int, bytes]]) -> Iterator[Record]:
    """Blank-line separated documents, each at the index of its first line."""
    buf, first = [], 0
    for i, raw in lines:
        if raw.strip():
            if not buf:
                first = i
            buf.append(raw)
        elif buf:
            yield Record(first, b"".join(buf), "txt")
            buf = []
    if buf:
        yield Record(first, b"".join(buf), "txt")


def iter_wiki_records(path: Path | None) -> Iterator[Record]:
    src = path or wiki_sample_path()
    with open(src, encoding="utf-8") as f:
        data = json.load(f)
    for title, rec in data.items():
        text = (rec or {}).get("extract") if isinstance(rec, dict) else None
        yield Record(f"{src}#{title}", text if isinstance(text, str) else None, "wiki")


def decode_record(rec: Record, fmt: str):
    """-> (fields, None) or (None, reason). fields: the three strings (llara-jsonl) or (text,)."""
    if rec.kind == "wiki":
        if rec.data is None:
            return None, "missing_field:extract"
        return (rec.data,), None
    try:
        s = rec.data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    if rec.kind == "txt":
        return (s,), None
    try:
        obj = json.loads(s)
    except ValueError:
        return None, "invalid_json"
    names = LLARA_FIELDS if fmt == "llara-jsonl" else ("text",)
    problem = field_problem(obj, names)
    if problem is not None:
        return None, problem
    vals = tuple(obj[k] for k in names)
    if not all(is_utf8(v) for v in vals):
        return None, "invalid_utf8"
    return vals, None


def batches(records: Iterable[Record], size: int, limit: int | None) -> Iterator[list[Record]]:
    """Lists of ``size`` records, the first ``limit`` records only (None or 0: all, as pretrain's data.limit 0)."""
    batch = []
    for i, rec in enumerate(records):
        if limit and i >= limit:
            break
        batch.append(rec)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def check_bad_fraction(seen: int, bad: int, max_bad_fraction: float, last: tuple, first: list, final: bool) -> None:
    if seen == 0 or bad / seen <= max_bad_fraction or (not final and seen < MIN_RECORDS_FOR_EARLY_STOP):
        return
    loc, reason = last
    firsts = ", ".join(f"{l} ({r})" for l, r in first[:3])
    raise PrepareError(f"{loc}: {reason}; {bad} of {seen} records are bad ({bad / seen:.2%}), above "
                       f"max_bad_fraction {max_bad_fraction:g}. First bad records: {firsts}")


class BadRecordCheck:
    """The bad-record rule over the whole record stream, as if it were tokenised in batches of
    ``batch`` records: after each batch holding bad records, and at the end. Blocks of records
    arrive in order with their bad records; a batch may span several blocks. In the message,
    a batch's bad records are in the order one batch's tokenisation meets them (by stage: decoding,
    tokenising, targets; then by record), the first 8 of each batch kept."""

    def __init__(self, batch: int, max_bad_fraction: float):
        self.batch, self.max_bad_fraction = batch, max_bad_fraction
        self.seen = self.bad = 0
        self.open: list = []   # bad records of the batch not yet complete: (stage, record index, loc, reason)
        self.first: list = []  # (loc, reason) of the first 8

    def batch_ends(self, n: int) -> np.ndarray:
        """Where batches end among the next ``n`` records (counts of them, in 1..n)."""
        return np.arange(self.batch - self.seen % self.batch, n + 1, self.batch, dtype=np.int64)

    def add(self, n: int, bads: Iterable[tuple[int, int, str, str]]) -> None:
        """The next ``n`` records, with their bad ones as (index among the n, stage, loc, reason)."""
        for i, stage, loc, reason in sorted(bads, key=lambda b: b[0]):
            g = self.seen + i
            if self.open and g >= self._open_end():
                self._close(self._open_end())
            self.open.append((stage, g, loc, reason))
        self.seen += n
        if self.open and self.seen >= self._open_end():
            self._close(self._open_end())

    def _open_end(self) -> int:
        return (self.open[0][1] // self.batch + 1) * self.batch

    def _close(self, seen: int) -> None:
        shown = [(loc, reason) for _, _, loc, reason in sorted(self.open)[:8]]
        self.bad += len(self.open)
        self.open = []
        self.first.extend(shown[:8 - len(self.first)])
        check_bad_fraction(seen, self.bad, self.max_bad_fraction, shown[-1], self.first, final=False)

    def finish(self) -> None:
        if self.open:
            self._close(self.seen)
        if self.first:
            check_bad_fraction(self.seen, self.bad, self.max_bad_fraction, self.first[-1], self.first, final=True)
