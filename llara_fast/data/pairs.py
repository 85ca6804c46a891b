"""Contrastive fine-tuning pairs: the FlagEmbedding JSONL, and a BEIR -> pairs converter.

    python -m llara_fast.data.pairs --beir DIR [--split train] [--negatives bm25|random] \\
        [--k 15] [--seed 0] [--rank-range LO:HI] --out FILE.jsonl [--overwrite]
    python -m llara_fast.data.pairs --beir DIR --mining dense --model M [--rank-range 30:200] --out FILE.jsonl

Format (FlagEmbedding's fine-tuning data, read unchanged): one JSON object per line,
``{"query": str, "pos": [str, ...], "neg": [str, ...]}``. Other keys are ignored; a missing
(or null) "neg" is an empty list. Texts are kept as written, not stripped.

``read_pairs`` skips bad records and counts them by reason, one reason per record, checked
in this order, naming the field and the type it needs: invalid_utf8, invalid_json,
bad_type:record:object (not a JSON object), missing_field:query, bad_type:query:str,
empty_query (blank query), missing_field:pos, bad_type:pos:list[str], no_positive (empty pos,
or every positive blank), bad_type:neg:list[str].
Blank strings inside pos / neg of a kept record are dropped and counted (dropped_empty_text).
Also counted: read (non-blank lines), kept, blank_line (not records). The first few bad
records are reported on stderr, one line each naming file:line and the reason (plain lines, not
Python warnings, which would show a source path); when bad / read exceeds
``max_bad_fraction`` a ValueError names the file, the counts and the first bad line.

``beir_to_pairs`` turns a BEIR split (read by ``llara_fast.data.beir.load_beir``: passages are
``title + " " + text``) into one record per query with a relevant document (judgement > 0) in
the corpus: pos = the texts of all its relevant documents, neg = ``k`` documents that are not
relevant to it, either the top BM25 hits of the query over the corpus (``bm25s``, English stop
words, no stemming), or the top hits of any other ranker (``llara_fast.mine`` passes a dense
one: the model's own nearest passages), or a uniform sample without replacement
(``random.Random(seed)``). With a rank window ``lo:hi`` (FlagEmbedding's ``range_for_sampling``)
the negatives are drawn uniformly (seeded) from the ranker's hits at ranks lo+1..hi that are not
positives, which leaves the very top, where unjudged relevant passages sit, alone. A document
whose text equals one of the query's positives is never a negative. Records carry query_id,
pos_ids and neg_ids for auditing. The output depends only on the inputs and seed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from llara_fast.config import opt
from llara_fast.data.beir import load_beir
from llara_fast.data.records import field_problem
from llara_fast.data.sources import iter_wiki_sample
from llara_fast.data.text import is_utf8
from llara_fast.errors import ConfigError, InputNotFound, UserError

try:
    import bm25s
except ImportError:  # only the "bm25" negatives need it
    bm25s = None

WARN_FIRST = 5          # bad records reported one by one; the rest only counted
BM25_EXTRA_HITS = 5     # hits retrieved beyond k + positives, to absorb same-text duplicates
# Negatives mined per query from a BEIR split when none is said (pairs --k, mine --k, finetune's
# data.mined): 15, as FlagEmbedding's hard-negative mining is run for its fine-tuning data
# (hn_mine --negative_number 15). The fine-tuner draws data.negatives of them per query and
# epoch (the released train_group_size 8 takes 7), so a pool above one group varies them.
MINED_NEGATIVES = 15
# A ranker: (corpus ids, corpus texts, query texts, depth) -> the top `depth` corpus indices per query.
Ranker = Callable[[list[str], list[str], list[str], int], list[list[int]]]


@dataclass
class Pair:
    query: str
    pos: list[str]
    neg: list[str]


# ---- reading / writing ------------------------------------------------------------------------
def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _non_blank(texts: list[str]) -> list[str]:
    return [t for t in texts if t.strip()]


def parse_pair(rec) -> tuple[Pair | None, str]:
    """A decoded JSON value -> (Pair, "") or (None, reason). Blank texts are dropped here."""
    problem = field_problem(rec, ("query",))
    if problem is not None:
        return None, problem
    query = rec["query"]
    if not query.strip():
        return None, "empty_query"
    pos = rec.get("pos")
    if pos is None:
        return None, "missing_field:pos"
    if not _is_str_list(pos):
        return None, "bad_type:pos:list[str]"
    if not _non_blank(pos):
        return None, "no_positive"
    neg = rec.get("neg")
    neg = [] if neg is None else neg
    if not _is_str_list(neg):
        return None, "bad_type:neg:list[str]"
    if not all(is_utf8(t) for t in [query, *pos, *neg]):
        return None, "invalid_utf8"  # a lone surrogate from a JSON escape ("\ud800"): no tokenizer takes it
    return Pair(query, _non_blank(pos), _non_blank(neg)), ""


def _decode(raw: bytes) -> tuple[object, str]:
    """One line's bytes -> (JSON value, "") or (None, reason)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    try:
        return json.loads(text), ""
    except json.JSONDecodeError:
        return None, "invalid_json"


def read_pairs(path: str | os.PathLike, counts: Counter | None = None,
               max_bad_fraction: float = 1.0) -> list[Pair]:
    """Read a FlagEmbedding pairs JSONL file; bad records are skipped and counted in ``counts``."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{path}: no such pairs file")
    counts = Counter() if counts is None else counts
    pairs: list[Pair] = []
    bad: list[tuple[int, str]] = []  # (line number, reason)
    with open(path, "rb") as f:  # lines split on b"\n"; a trailing "\r" is JSON whitespace
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
            if not raw.strip():
                counts["blank_line"] += 1
                continue
            counts["read"] += 1
            rec, reason = _decode(raw)
            pair = None
            if not reason:
                pair, reason = parse_pair(rec)
            if pair is None:
                counts[reason] += 1
                bad.append((lineno, reason))
                if len(bad) <= WARN_FIRST:
                    print(f"{path}:{lineno}: {reason} (record skipped)", file=sys.stderr)
                continue
            dropped = len(rec["pos"]) + len(rec.get("neg") or []) - len(pair.pos) - len(pair.neg)
            if dropped:
                counts["dropped_empty_text"] += dropped
            counts["kept"] += 1
            pairs.append(pair)
    if len(bad) > WARN_FIRST:
        print(f"{path}: {len(bad) - WARN_FIRST} more bad records skipped", file=sys.stderr)
    _check_bad_fraction(path, counts, bad, max_bad_fraction)
    return pairs


def _check_bad_fraction(path: Path, counts: Counter, bad: list[tuple[int, str]], max_bad_fraction: float) -> None:
    if not bad or len(bad) / counts["read"] <= max_bad_fraction:
        return
    lineno, reason = bad[0]
    summary = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if v)
    raise UserError(f"{path}: {len(bad)} of {counts['read']} records are bad "
                     f"({len(bad) / counts['read']:.1%} > max_bad_fraction {max_bad_fraction:g}); "
                     f"counts: {summary}; first bad record: {path}:{lineno} ({reason})")


def write_pairs(pairs: Iterable[Pair | dict], path: str | os.PathLike) -> int:
    """Write Pairs or dicts as JSONL (UTF-8, one object per line); returns the number written.
    Written to a temporary file beside ``path`` and renamed, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for p in pairs:
                f.write(json.dumps(asdict(p) if isinstance(p, Pair) else p, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def check_out(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an existing output file unless ``overwrite`` (--overwrite), before any work."""
    if Path(path).exists() and not overwrite:
        raise UserError(f"{path}: exists (pass --overwrite to replace it)")


# ---- BEIR -> pairs ----------------------------------------------------------------------------
def bm25_search(doc_texts: list[str], query_texts: list[str], depth: int) -> tuple[np.ndarray, np.ndarray]:
    """BM25 (bm25s, English stop words): the top ``depth`` corpus indices per query, best first,
    and their scores, both (Q, min(depth, N))."""
    if bm25s is None:
        raise RuntimeError("bm25s is not installed: pip install bm25s (or use negatives='random')")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(doc_texts, stopwords="en", show_progress=False), show_progress=False)
    query_tokens = bm25s.tokenize(query_texts, stopwords="en", return_ids=False, show_progress=False)
    docs, scores = retriever.retrieve(query_tokens, k=min(depth, len(doc_texts)), show_progress=False)
    return docs, scores  # (Q, depth) each


def _bm25_ranked(doc_texts: list[str], query_texts: list[str], depth: int) -> list[list[int]]:
    """Top ``depth`` corpus indices per query by BM25 score (best first)."""
    return bm25_search(doc_texts, query_texts, depth)[0].tolist()  # (Q, depth)


def _random_ranked(n_docs: int, n_queries: int, depth: int, seed: int) -> list[list[int]]:
    """``depth`` distinct corpus indices per query, uniform; one RNG over the queries in order.
    Dropping a query's positives from a uniform ordered sample leaves a uniform sample of the rest."""
    rng = random.Random(seed)
    return [rng.sample(range(n_docs), min(depth, n_docs)) for _ in range(n_queries)]


def _pick_negatives(ranked: list[int], pos: list[int], doc_texts: list[str], k: int, counts: Counter) -> list[int]:
    """The first ``k`` of ``ranked`` whose text is not a positive's text (so never a positive)."""
    pos_texts = {doc_texts[j] for j in pos}
    chosen = []
    for j in ranked:
        if len(chosen) == k:
            break
        if doc_texts[j] in pos_texts:
            counts["neg_same_text_as_pos"] += j not in pos  # a copy of a positive under another id
            continue
        chosen.append(j)
    return chosen


def parse_rank_range(s: str | None) -> tuple[int, int] | None:
    """'30:200' -> (30, 200): the hits at ranks 31..200 (a Python slice of the ranking)."""
    if not s:
        return None
    lo, sep, hi = s.partition(":")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit() or int(lo) >= int(hi):
        raise UserError(f"rank range {s!r}: expected LO:HI with 0 <= LO < HI, e.g. 30:200")
    return int(lo), int(hi)


def beir_to_pairs(beir_dir: str | os.PathLike, split: str = "train", negatives: str | Ranker = "bm25",
                  k: int = MINED_NEGATIVES, seed: int = 0, counts: Counter | None = None,
                  rank_range: tuple[int, int] | None = None) -> list[dict]:
    """One record {"query", "pos", "neg", "query_id", "pos_ids", "neg_ids"} per query of the split
    with a relevant document in the corpus; ``negatives``: "bm25", "random" or a Ranker; see the
    module docstring for the negatives and the rank window."""

    if not callable(negatives) and negatives not in ("bm25", "random"):
        raise UserError(f"unknown negatives {negatives!r} (bm25 or random; dense: python -m llara_fast.mine)")
    if rank_range is not None and negatives == "random":
        raise UserError("a rank window needs ranked negatives (bm25 or dense), not random ones")
    if k < 0:
        raise UserError(f"k must be >= 0, got {k}")
    counts = Counter() if counts is None else counts
    data = load_beir(beir_dir, split)
    counts.update(data.counts)
    counts["no_positive"] += data.counts.get("queries_no_relevant", 0)
    row = {d: i for i, d in enumerate(data.doc_ids)}

    # positives: relevant documents present in the corpus (load_beir counts the absent ones)
    queries = []  # (query id, query text, positive corpus indices)
    for qid, qtext in zip(data.query_ids, data.query_texts):
        pos = [row[d] for d, rel in data.qrels[qid].items() if rel > 0 and d in row]
        if not pos:
            counts["no_positive"] += 1
            continue
        queries.append((qid, qtext, pos))

    depth = rank_range[1] if rank_range else k + max((len(p) for _, _, p in queries), default=0) + BM25_EXTRA_HITS
    query_texts = [q for _, q, _ in queries]
    if negatives == "random":
        ranked = _random_ranked(len(data.doc_ids), len(queries), depth, seed)
    elif not queries:
        ranked = []
    elif negatives == "bm25":
        ranked = _bm25_ranked(data.doc_texts, query_texts, depth)
    else:
        ranked = negatives(data.doc_ids, data.doc_texts, query_texts, min(depth, len(data.doc_ids)))
    rng = random.Random(seed)

    records = []
    for (qid, qtext, pos), hits in zip(queries, ranked):
        if rank_range:  # the window's non-positives, shuffled: k drawn uniformly from them
            positives = set(pos)
            hits = [j for j in hits[rank_range[0]:rank_range[1]] if j not in positives]
            rng.shuffle(hits)
        neg = _pick_negatives(hits, pos, data.doc_texts, k, counts)
        if len(neg) < k:
            counts["short_negatives"] += 1
        records.append({"query": qtext, "pos": [data.doc_texts[j] for j in pos],
                        "neg": [data.doc_texts[j] for j in neg], "query_id": qid,
                        "pos_ids": [data.doc_ids[j] for j in pos], "neg_ids": [data.doc_ids[j] for j in neg]})
    counts["records"] += len(records)
    counts["positives"] += sum(len(r["pos"]) for r in records)
    counts["negatives"] += sum(len(r["neg"]) for r in records)
    return records


# ---- CLI --------------------------------------------------------------------------------------
# ---- the training records of llara_fast.finetune -----------------------------------------------
def wiki_pairs(limit: int, negatives: int, seed: int) -> list[dict]:
    """The embedded default: title -> its lead paragraph, negatives drawn from other paragraphs."""
    items = [(t, x) for t, x in islice(iter_wiki_sample(), limit or None) if t.strip() and x.strip()]
    rng = np.random.default_rng(seed)
    out = []
    for i, (title, text) in enumerate(items):
        draw = rng.choice(len(items), min(negatives + 1, len(items)), replace=False)
        neg = [items[j][1] for j in draw if j != i][:negatives]
        out.append({"query": title, "pos": [text], "neg": neg})
    return out


@dataclass
class FinetuneDataConfig:
    """The [data] section of llara_fast.finetune."""
    train: str = opt("", "FlagEmbedding JSONL ({\"query\", \"pos\", \"neg\"} per line)")
    beir: str = opt("", "or a BEIR directory, converted on the fly")
    split: str = opt("train", "BEIR split to train on")
    mining: str = opt("bm25", "BEIR negatives: bm25 (hard) or random", ("bm25", "random"))
    mined: int = opt(MINED_NEGATIVES, "BEIR negatives mined per query (data.negatives are sampled from them)")
    limit: int = opt(0, "first N records (0: all)")
    queries: int = opt(4, "queries per micro-batch and rank")
    negatives: int = opt(3, "hard negatives per query (group = 1 + negatives)")
    query_max_len: int = opt(64, "query TEXT tokens")
    passage_max_len: int = opt(256, "passage TEXT tokens")
    grad_accum: int = opt(1, "micro-batches per rank per step")
    max_bad_fraction: float = opt(0.5, "stop when more records than this are unusable")
    seed: int = opt(0, "data order and negative sampling")


def load_records(d: FinetuneDataConfig) -> tuple[list[dict], Counter, str]:
    """Training records of a fine-tuning data section (data.train, data.beir, or the Wikipedia
    sample) as dicts, the skip counts, and a description of the source. Every rank reads (or
    mines) the same records deterministically."""
    counts: Counter = Counter()
    if d.train and d.beir:
        raise ConfigError("give data.train or data.beir, not both")
    if d.train:
        pairs = read_pairs(d.train, counts, max_bad_fraction=d.max_bad_fraction)
        recs = [{"query": p.query, "pos": p.pos, "neg": p.neg} for p in pairs]
        src = d.train
    elif d.beir:
        if d.mining not in ("bm25", "random"):
            raise ConfigError(f"data.mining must be bm25 or random, got {d.mining!r}")
        recs = beir_to_pairs(d.beir, d.split, negatives=d.mining, k=d.mined, seed=d.seed, counts=counts)
        src = f"{d.beir} ({d.split}, {d.mining} negatives)"
    else:
        recs = wiki_pairs(d.limit or 2000, max(d.negatives, 1), d.seed)
        src = "wiki-sample (title -> lead paragraph)"
    if d.limit:
        recs = recs[:d.limit]
    return recs, counts, src


def tokenize_records(recs: list[dict], tokenizer, q_len: int, p_len: int):
    """(query ids, [positive ids], [negative ids]) per record, cut to the max lengths; the texts
    shared between records are tokenised once."""
    texts = sorted({t for r in recs for t in r["pos"] + r["neg"]})
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=p_len)["input_ids"] if texts else []
    ids = dict(zip(texts, enc))
    qs = tokenizer([r["query"] for r in recs], add_special_tokens=False, truncation=True,
                   max_length=q_len)["input_ids"]
    return [(q, [ids[t] for t in r["pos"]], [ids[t] for t in r["neg"]]) for q, r in zip(qs, recs)]


def main(argv: list[str] | None = None) -> int:
    """Convert a BEIR split to FlagEmbedding fine-tuning JSONL with hard (BM25) or random negatives."""
    p = argparse.ArgumentParser(prog="python -m llara_fast.data.pairs", description=main.__doc__)
    p.add_argument("--beir", required=True, help="BEIR dataset directory (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--split", default="train", help="qrels split (qrels/<split>.tsv); default train")
    p.add_argument("--negatives", "--mining", choices=("bm25", "random", "dense"), default="bm25",
                   help="top BM25 hits that are not relevant, a uniform random sample, or dense: mined by --model "
                        "itself (runs python -m llara_fast.mine); default bm25")
    p.add_argument("--model", help="with --mining dense: the model that ranks (preset, HF dir, checkpoint, Hub id)")
    p.add_argument("--revision", default="main", help="with --mining dense: branch, tag or commit of a Hub --model")
    p.add_argument("--embeddings", help="with --mining dense: the corpus's shards from llara_fast.encode --corpus")
    p.add_argument("--k", type=int, default=MINED_NEGATIVES, help=f"negatives per query (default {MINED_NEGATIVES})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random negatives; default 0")
    p.add_argument("--rank-range", help="draw the negatives from the BM25 hits at ranks LO+1..HI, e.g. 10:100")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a = p.parse_args(argv)
    if a.negatives == "dense":
        return _run_dense_miner(p, a)
    t0 = time.perf_counter()
    counts: Counter = Counter()
    try:
        check_out(a.out, a.overwrite)
        records = beir_to_pairs(a.beir, a.split, a.negatives, a.k, a.seed, counts, parse_rank_range(a.rank_range))
        write_pairs(records, a.out)
    except UserError as e:
        print(f"pairs: error: {e}", file=sys.stderr)
        return 2
    summary = " ".join(f"{k}={v}" for k, v in sorted(counts.items()) if v)
    print(f"pairs: {len(records)} records ({a.negatives}, k={a.k}) -> {a.out} in {time.perf_counter() - t0:.1f}s; "
          f"{summary}")
    return 0


def _run_dense_miner(p: argparse.ArgumentParser, a) -> int:
    """Dense mining needs the encoder, which this layer does not import: hand the same request to
    its entry point, python -m llara_fast.mine, in a child process."""
    if not a.model:
        p.error("--mining dense needs --model")
    cmd = [sys.executable, "-m", "llara_fast.mine", "--beir", a.beir, "--split", a.split, "--model", a.model,
           "--revision", a.revision, "--k", str(a.k), "--seed", str(a.seed), "--out", a.out]
    cmd += ["--rank-range", a.rank_range] if a.rank_range else []
    cmd += ["--embeddings", a.embeddings] if a.embeddings else []
    cmd += ["--overwrite"] if a.overwrite else []
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
