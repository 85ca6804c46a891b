"""BEIR-format datasets: corpus.jsonl ({"_id", "title", "text"}), queries.jsonl ({"_id", "text"})
and qrels/<split>.tsv (query-id, corpus-id, score; a header line and CRLF line ends are fine;
4-column TREC qrels "qid iter docid rel" are read too). Passages are ``title + " " + text``
(BEIR's own join for dense models; just the text when the title is empty).

Bad input never crashes a run: invalid lines, documents without title and text (left out),
documents with a title only (the title), duplicate ids, judgements of unknown documents or
queries are each counted by reason (``BeirData.counts``)."""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from llara_fast.errors import InputNotFound


@dataclass
class BeirData:
    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]    # the queries to evaluate: judged, with a relevant document, with text
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    counts: Counter = field(default_factory=Counter)

    def problems(self) -> list[str]:
        return [f"{k.replace('_', ' ')}: {v}" for k, v in sorted(self.counts.items()) if v]

    def subset(self, max_docs: int, seed: int = 0) -> "BeirData":
        """A corpus of at most max_docs documents for quick comparisons. The documents judged
        relevant to the evaluated queries count toward max_docs and are always kept: where they
        alone are more, the queries whose relevant documents no longer fit (in order) are left out
        and counted (queries_over_max_docs); documents drawn at random (seeded) fill the rest, in
        corpus order. Scores on a subset are higher than on the full corpus; compare them only
        with each other."""
        if max_docs <= 0 or max_docs >= len(self.doc_ids):
            return self
        present, keep, queries = set(self.doc_ids), set(), []
        counts = Counter(self.counts)
        for q, text in zip(self.query_ids, self.query_texts):
            relevant = {d for d, r in self.qrels[q].items() if r > 0} & present
            if len(keep | relevant) > max_docs:
                counts["queries_over_max_docs"] += 1
                continue
            keep |= relevant
            queries.append((q, text))
        dropped = set(self.query_ids) - {q for q, _ in queries}
        others = [d for d in self.doc_ids if d not in keep]
        rng = np.random.default_rng(seed)
        n_more = max(0, max_docs - len(keep))
        keep |= {others[i] for i in rng.choice(len(others), min(n_more, len(others)), replace=False)}
        pairs = [(d, t) for d, t in zip(self.doc_ids, self.doc_texts) if d in keep]
        return BeirData([d for d, _ in pairs], [t for _, t in pairs], [q for q, _ in queries],
                        [t for _, t in queries], {q: r for q, r in self.qrels.items() if q not in dropped}, counts)


REASONS = {
    "corpus_invalid_json": "corpus.jsonl lines that are not JSON (skipped)",
    "corpus_bad_type:record:object": "corpus.jsonl lines that are JSON but not an object (skipped)",
    "corpus_missing_field:_id": "corpus.jsonl records without an _id (skipped)",
    "corpus_duplicate_id": "corpus.jsonl duplicate _id (first kept)",
    "corpus_no_text": "documents without title and text (left out of the index)",
    "corpus_title_only": "documents with a title but no text (encoded as the title)",
    "queries_invalid_json": "queries.jsonl lines that are not JSON (skipped)",
    "queries_bad_type:record:object": "queries.jsonl lines that are JSON but not an object (skipped)",
    "queries_missing_field:_id": "queries.jsonl records without an _id (skipped)",
    "queries_duplicate_id": "queries.jsonl duplicate _id (first kept)",
    "queries_empty_text": "queries with empty text (skipped)",
    "qrels_bad_columns:query-id,corpus-id,score": "qrels lines without the three columns (skipped)",
    "qrels_bad_type:score:int": "qrels lines whose score is not an integer, e.g. 0.5 or inf (skipped)",
    "qrels_duplicate": "qrels lines repeating a (query, document) pair (the first kept)",
    "qrels_header": "qrels header line",
    "qrels_unknown_query": "judged query ids absent from queries.jsonl (skipped)",
    "qrels_unknown_doc": "judgements of documents absent from the corpus (kept: unretrievable)",
    "queries_no_relevant": "judged queries without a relevant document (skipped)",
    "queries_not_in_split": "queries.jsonl queries without judgements in this split (not evaluated)",
    "queries_missing_from_run": "judged queries absent from the run (skipped)",
    "run_queries_without_qrels": "run queries without judgements (ignored)",
    "queries_over_max_docs": "queries left out: their relevant documents did not fit the max_docs cap (which the "
                             "relevant documents of the evaluated queries count toward)",
}


def _read_jsonl(path: Path, what: str, counts: Counter) -> Iterator[dict]:
    if not path.is_file():
        raise InputNotFound(f"{path}: missing (a BEIR dataset directory holds corpus.jsonl, queries.jsonl "
                                "and qrels/<split>.tsv)")
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # universal newlines: CRLF is fine
        for line in f:
            rec = _line_record(line, what, counts)
            if rec is not None:
                yield rec


def _line_record(line: str, what: str, counts: Counter) -> dict | None:
    """A corpus / queries line's record with its _id as a string, or None (blank; or bad, counted
    by a reason that names the field and type: WHAT_invalid_json, WHAT_bad_type:record:object,
    WHAT_missing_field:_id)."""
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        counts[f"{what}_invalid_json"] += 1
        return None
    if not isinstance(rec, dict):
        counts[f"{what}_bad_type:record:object"] += 1
        return None
    if rec.get("_id") is None:
        counts[f"{what}_missing_field:_id"] += 1
        return None
    rec["_id"] = str(rec["_id"])
    return rec


def _text(v) -> str:
    return v.strip() if isinstance(v, str) else ""


def passage_text(rec: dict, counts: Counter) -> str | None:
    """A corpus record's passage, ``title + " " + text``; None (counted) when it has neither."""
    title, text = _text(rec.get("title")), _text(rec.get("text"))
    if not text:
        counts["corpus_title_only" if title else "corpus_no_text"] += 1
        if not title:
            return None
    return f"{title} {text}".strip()


def corpus_doc(line: str, counts: Counter) -> tuple[str, str] | None:
    """(id, passage) of one corpus.jsonl line, or None when it holds none (counted by reason;
    a blank line is neither counted nor a document)."""
    rec = _line_record(line, "corpus", counts)
    if rec is None:
        return None
    text = passage_text(rec, counts)
    return None if text is None else (rec["_id"], text)


def _judgement(s: str) -> int:
    """An integer judgement: "2", or a float that is an integer ("1.0"); anything else (0.5, inf,
    nan, words) raises ValueError."""
    try:
        return int(s)
    except ValueError:
        v = float(s)
        if not math.isfinite(v) or v != int(v):
            raise ValueError(f"judgement {s!r} is not an integer") from None
        return int(v)


def read_qrels(path: Path, counts: Counter) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for n, line in enumerate(f):
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) == 1:
                parts = line.split()
            if not "".join(parts).strip():
                continue
            if len(parts) == 4:  # TREC: qid iter docid rel
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3:
                counts["qrels_bad_columns:query-id,corpus-id,score"] += 1
                continue
            q, d, s = (p.strip() for p in parts)
            try:
                score = _judgement(s)
            except ValueError:
                counts["qrels_header" if n == 0 else "qrels_bad_type:score:int"] += 1
                continue
            if d in qrels.get(q, {}):
                counts["qrels_duplicate"] += 1  # the first judgement is kept
                continue
            qrels.setdefault(q, {})[d] = score
    return qrels


def load_beir(root: str | os.PathLike, split: str = "test", with_corpus: bool = True) -> BeirData:
    """The dataset; ``with_corpus=False`` leaves the corpus unread (its embeddings come from
    elsewhere): doc_ids/doc_texts are then empty and judged documents are not checked."""
    root = Path(root)
    if not root.is_dir():
        raise InputNotFound(f"{root}: no such BEIR dataset directory")
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        have = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        raise InputNotFound(f"{qrels_path}: no qrels for split {split!r}; "
                                f"available splits: {', '.join(have) if have else 'none (no qrels/ directory)'}")
    counts: Counter = Counter()
    docs: dict[str, str] = {}
    for rec in _read_jsonl(root / "corpus.jsonl", "corpus", counts) if with_corpus else ():
        if rec["_id"] in docs:
            counts["corpus_duplicate_id"] += 1
            continue
        text = passage_text(rec, counts)
        if text is not None:
            docs[rec["_id"]] = text
    queries: dict[str, str] = {}
    for rec in _read_jsonl(root / "queries.jsonl", "queries", counts):
        if rec["_id"] in queries:
            counts["queries_duplicate_id"] += 1
        elif not _text(rec.get("text")):
            counts["queries_empty_text"] += 1
        else:
            queries[rec["_id"]] = _text(rec["text"])
    qrels = read_qrels(qrels_path, counts)
    qids = []
    for q, rels in qrels.items():
        counts["qrels_unknown_doc"] += sum(1 for d in rels if d not in docs) if with_corpus else 0
        if q not in queries:
            counts["qrels_unknown_query"] += 1
        elif not any(r > 0 for r in rels.values()):
            counts["queries_no_relevant"] += 1
        else:
            qids.append(q)
    counts["queries_not_in_split"] = sum(1 for q in queries if q not in qrels)
    return BeirData(list(docs), list(docs.values()), qids, [queries[q] for q in qids], qrels, +counts)
