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

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

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
    loc: str              # "path:line" or "path#title"
    data: bytes | str | None  # raw JSON line / .txt document bytes, or the decoded wiki text
    kind: str             # "json", "txt" or "wiki"


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


def _lines(fp: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a file, a leading UTF-8 byte-order mark dropped; an unreadable file
    is one PrepareError naming it."""
    try:
        with open(fp, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                yield lineno, raw.removeprefix(BOM) if lineno == 1 else raw
    except OSError as e:
        raise PrepareError(f"{fp}: cannot read it ({e.strerror or e})") from None


def iter_records(path: Path | None, fmt: str, counters: Counter) -> Iterator[Record]:
    if fmt == "wiki-sample":
        src = path or wiki_sample_path()
        with open(src, encoding="utf-8") as f:
            data = json.load(f)
        for title, rec in data.items():
            text = (rec or {}).get("extract") if isinstance(rec, dict) else None
            yield Record(f"{src}#{title}", text if isinstance(text, str) else None, "wiki")
        return
    for fp in input_files(path, fmt):
        if fp.suffix == ".txt":
            yield from _iter_txt(fp)
            continue
        for lineno, raw in _lines(fp):
            if not raw.strip():
                counters["blank_lines"] += 1
                continue
            yield Record(f"{fp}:{lineno}", raw, "json")


def _iter_txt(fp: Path) -> Iterator[Record]:
    buf, first = [], 0
    for lineno, raw in _lines(fp):
        if raw.strip():
            if not buf:
                first = lineno
            buf.append(raw)
        elif buf:
            yield Record(f"{fp}:{first}", b"".join(buf), "txt")
            buf = []
    if buf:
        yield Record(f"{fp}:{first}", b"".join(buf), "txt")


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
