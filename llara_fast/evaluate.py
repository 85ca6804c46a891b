"""Retrieval evaluation on a BEIR-format dataset with faiss.

    python -m llara_fast.evaluate --model M --beir DIR [--split test] [--out FILE] [--hf-baseline N]

DIR holds corpus.jsonl ({"_id", "title", "text"}), queries.jsonl ({"_id", "text"}) and
qrels/<split>.tsv (query-id, corpus-id, score; a header line and CRLF line ends are fine;
4-column TREC qrels "qid iter docid rel" are read too). Passages are encoded as
``title + " " + text`` (BEIR's own join for dense models; just the text when the title is
empty), queries as their text; exact inner-product search (faiss IndexFlatIP, on the GPU when
faiss has GPUs); nDCG@10, MRR@10 and Recall@100 printed as a table, then one JSON line.

Definitions (tested against hand-computed cases in tests/test_evaluate.py):
- a document is relevant when its judgement is > 0; judgements <= 0 count as not relevant.
- nDCG@k: gain = the judgement (linear, as trec_eval / pytrec_eval / BEIR), discount
  1/log2(rank + 1), divided by the DCG of the ideal ordering of all judged documents.
- MRR@k: 1/rank of the first relevant document in the top k, else 0.
- Recall@k: relevant documents in the top k / all relevant documents of the query (relevant
  documents missing from the corpus still count in the denominator).
- ranking: score descending, ties broken by document id ascending (string order), so a run
  gives the same numbers whatever order it is stored in. (trec_eval breaks ties the other way.)
- queries whose judgements hold no relevant document are skipped and counted; queries of the
  qrels absent from the run (e.g. absent from queries.jsonl) are skipped and counted; run
  queries without judgements are ignored and counted. Means are over evaluated queries.

Bad input never crashes the run: invalid lines, documents without title and text (left out
of the index), documents with a title only (encoded as the title), duplicate ids, judgements
of unknown documents or queries are each counted by reason and reported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

try:  # faiss-cpu (requirements.txt) or faiss-gpu (pip install 'llara-fast[gpu]')
    import faiss
except ImportError:
    faiss = None

METRICS = ("ndcg@10", "mrr@10", "recall@100")
DEFAULT_K = 100


# ---- metrics ----------------------------------------------------------------------------------
def rank(scores: Mapping[str, float]) -> list[str]:
    """Document ids by score descending, ties by document id ascending."""
    return sorted(scores, key=lambda d: (-scores[d], d))


def ndcg_at_k(ranking: list[str], rels: Mapping[str, int], k: int) -> float:
    dcg = sum(max(rels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(ranking: list[str], rels: Mapping[str, int], k: int) -> float:
    for i, d in enumerate(ranking[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranking: list[str], rels: Mapping[str, int], k: int) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant.intersection(ranking[:k])) / len(relevant) if relevant else 0.0


@dataclass
class Evaluation:
    means: dict[str, float]               # metric -> mean over evaluated queries
    per_query: dict[str, dict[str, float]]
    counts: Counter = field(default_factory=Counter)

    @property
    def n_queries(self) -> int:
        return len(self.per_query)


def evaluate_run(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
                 ndcg_k: int = 10, mrr_k: int = 10, recall_k: int = 100) -> Evaluation:
    """Score a run {query: {doc: score}} against qrels {query: {doc: judgement}}."""
    counts: Counter = Counter()
    per_query = {}
    for q, rels in qrels.items():
        if not any(r > 0 for r in rels.values()):
            counts["queries_no_relevant"] += 1
            continue
        if q not in run:
            counts["queries_missing_from_run"] += 1
            continue
        ranking = rank(run[q])
        per_query[q] = {f"ndcg@{ndcg_k}": ndcg_at_k(ranking, rels, ndcg_k),
                        f"mrr@{mrr_k}": mrr_at_k(ranking, rels, mrr_k),
                        f"recall@{recall_k}": recall_at_k(ranking, rels, recall_k)}
    counts["run_queries_without_qrels"] = sum(1 for q in run if q not in qrels)
    names = (f"ndcg@{ndcg_k}", f"mrr@{mrr_k}", f"recall@{recall_k}")
    means = {m: (sum(v[m] for v in per_query.values()) / len(per_query) if per_query else float("nan"))
             for m in names}
    return Evaluation(means, per_query, +counts)


# ---- BEIR data --------------------------------------------------------------------------------
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
        """A smaller corpus for quick comparisons: every document judged relevant to an evaluated
        query, plus documents drawn at random (seeded) up to max_docs in all, in corpus order.
        Scores on a subset are higher than on the full corpus; compare them only with each other."""
        if max_docs <= 0 or max_docs >= len(self.doc_ids):
            return self
        keep = {d for q in self.query_ids for d, r in self.qrels[q].items() if r > 0}
        keep &= set(self.doc_ids)
        others = [d for d in self.doc_ids if d not in keep]
        rng = np.random.default_rng(seed)
        n_more = max(0, max_docs - len(keep))
        keep |= {others[i] for i in rng.choice(len(others), min(n_more, len(others)), replace=False)}
        pairs = [(d, t) for d, t in zip(self.doc_ids, self.doc_texts) if d in keep]
        return BeirData([d for d, _ in pairs], [t for _, t in pairs], self.query_ids, self.query_texts, self.qrels,
                        self.counts)


_WHY = {
    "corpus_bad_line": "corpus.jsonl lines that are not a JSON object with an _id (skipped)",
    "corpus_duplicate_id": "corpus.jsonl duplicate _id (first kept)",
    "corpus_no_text": "documents without title and text (left out of the index)",
    "corpus_title_only": "documents with a title but no text (encoded as the title)",
    "queries_bad_line": "queries.jsonl lines that are not a JSON object with an _id (skipped)",
    "queries_duplicate_id": "queries.jsonl duplicate _id (first kept)",
    "queries_empty_text": "queries with empty text (skipped)",
    "qrels_bad_line": "qrels lines without query, document and integer score (skipped)",
    "qrels_header": "qrels header line",
    "qrels_unknown_query": "judged query ids absent from queries.jsonl (skipped)",
    "qrels_unknown_doc": "judgements of documents absent from the corpus (kept: unretrievable)",
    "queries_no_relevant": "judged queries without a relevant document (skipped)",
    "queries_not_in_split": "queries.jsonl queries without judgements in this split (not evaluated)",
    "queries_missing_from_run": "judged queries absent from the run (skipped)",
    "run_queries_without_qrels": "run queries without judgements (ignored)",
}


def _read_jsonl(path: Path, what: str, counts: Counter) -> Iterator[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a BEIR dataset directory holds corpus.jsonl, queries.jsonl "
                                "and qrels/<split>.tsv)")
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # universal newlines: CRLF is fine
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict) or rec.get("_id") is None:
                counts[f"{what}_bad_line"] += 1
                continue
            rec["_id"] = str(rec["_id"])
            yield rec


def _text(v) -> str:
    return v.strip() if isinstance(v, str) else ""


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
            try:
                q, d, s = (p.strip() for p in parts)
                score = int(float(s))
            except ValueError:
                counts["qrels_header" if n == 0 else "qrels_bad_line"] += 1
                continue
            qrels.setdefault(q, {})[d] = score
    return qrels


def load_beir(root: str | os.PathLike, split: str = "test") -> BeirData:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such BEIR dataset directory")
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        have = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        raise FileNotFoundError(f"{qrels_path}: no qrels for split {split!r}; "
                                f"available splits: {', '.join(have) if have else 'none (no qrels/ directory)'}")
    counts: Counter = Counter()
    docs: dict[str, str] = {}
    for rec in _read_jsonl(root / "corpus.jsonl", "corpus", counts):
        if rec["_id"] in docs:
            counts["corpus_duplicate_id"] += 1
            continue
        title, text = _text(rec.get("title")), _text(rec.get("text"))
        if not text:
            counts["corpus_title_only" if title else "corpus_no_text"] += 1
            if not title:
                continue
        docs[rec["_id"]] = f"{title} {text}".strip()
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
        counts["qrels_unknown_doc"] += sum(1 for d in rels if d not in docs)
        if q not in queries:
            counts["qrels_unknown_query"] += 1
        elif not any(r > 0 for r in rels.values()):
            counts["queries_no_relevant"] += 1
        else:
            qids.append(q)
    counts["queries_not_in_split"] = sum(1 for q in queries if q not in qrels)
    return BeirData(list(docs), list(docs.values()), qids, [queries[q] for q in qids], qrels, +counts)


# ---- search -----------------------------------------------------------------------------------
def search(doc_emb: np.ndarray, query_emb: np.ndarray, k: int, backend: str = "faiss"):
    """Exact inner-product top-k: (scores (Q, k), indices (Q, k)); k is capped at the corpus size.
    backend "faiss" (IndexFlatIP; moved to the GPU when faiss sees one) or "numpy"."""
    doc_emb = np.ascontiguousarray(doc_emb, dtype=np.float32)
    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
    k = min(k, doc_emb.shape[0])
    if backend == "faiss":
        if faiss is None:
            raise RuntimeError("faiss is not installed: pip install faiss-cpu (or 'llara-fast[gpu]'), "
                               "or search with backend='numpy'")
        index = faiss.IndexFlatIP(doc_emb.shape[1])
        if _faiss_gpus() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(doc_emb)
        return index.search(query_emb, k)
    if backend != "numpy":
        raise ValueError(f"unknown search backend {backend!r} (faiss or numpy)")
    scores = query_emb @ doc_emb.T  # (Q, D)
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, k)
    return np.take_along_axis(scores, idx, 1), idx


def _faiss_gpus() -> int:
    try:
        return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") and hasattr(faiss, "index_cpu_to_all_gpus") else 0
    except Exception:  # a faiss-gpu build on a machine without a usable GPU
        return 0


def to_run(query_ids: list[str], doc_ids: list[str], scores: np.ndarray, idx: np.ndarray) -> dict:
    return {q: {doc_ids[j]: float(s) for s, j in zip(scores[i], idx[i]) if j >= 0}
            for i, q in enumerate(query_ids)}


# ---- the HF padded baseline (speed reference) ------------------------------------------------
def hf_padded_encode(model_dir: str | os.PathLike, ids: list[list[int]], template, kind: str = "passage",
                     batch_size: int = 16):
    """Embeddings of pre-tokenised texts through transformers' AutoModel the way the released
    LLaRA code runs it: batches in the given order, left-padded to the longest (multiple of 8),
    SDPA attention, fp32 on CPU. Returns (embeddings (n, d), real tokens, padded tokens, seconds)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    suffix = list(template.sum_ids if kind == "passage" else template.pred_ids)
    K = template.n_special
    out, real, padded = [], 0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ids), batch_size):
            rows = [list(template.prefix_ids) + list(t) + suffix for t in ids[i:i + batch_size]]
            L = -(-max(map(len, rows)) // 8) * 8
            inp = torch.full((len(rows), L), pad, dtype=torch.long)
            att = torch.zeros(len(rows), L, dtype=torch.long)
            for j, r in enumerate(rows):
                inp[j, L - len(r):] = torch.tensor(r)
                att[j, L - len(r):] = 1
            hidden = model(input_ids=inp, attention_mask=att).last_hidden_state  # (B, L, d)
            out.append(F.normalize(hidden[:, -K:].float().mean(1), dim=-1))
            real += sum(map(len, rows))
            padded += inp.numel()
    return torch.cat(out), real, padded, time.perf_counter() - t0


# ---- CLI -------------------------------------------------------------------------------------
def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def run_evaluation(args) -> dict:
    import torch

    from llara_fast.encode import Encoder

    t_start = time.perf_counter()
    data = load_beir(args.beir, args.split)
    full_docs = len(data.doc_ids)
    data = data.subset(args.max_docs, args.seed)
    name = Path(args.beir).name
    print(f"{name} ({args.split}): {len(data.doc_ids)} documents, {len(data.query_ids)} queries to evaluate",
          file=sys.stderr)
    if not data.doc_ids or not data.query_ids:
        raise ValueError(f"{args.beir}: nothing to evaluate ({len(data.doc_ids)} documents, "
                         f"{len(data.query_ids)} queries with relevant documents)")
    t0 = time.perf_counter()
    enc = Encoder.from_pretrained(args.model, attn_backend=args.attn, max_len=args.max_len,
                                  token_budget=args.token_budget, device=args.device)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    doc_ids_tok = enc.tokenize(data.doc_texts)
    t_tok = time.perf_counter() - t0
    doc_emb = enc.encode_ids(doc_ids_tok, "passage", progress=not args.quiet)
    p_stats = dict(enc.stats)
    q_emb = enc.encode(data.query_texts, "query", progress=not args.quiet)
    q_stats = dict(enc.stats)
    t0 = time.perf_counter()
    backend = "faiss" if faiss is not None else "numpy"
    scores, idx = search(doc_emb.numpy(), q_emb.numpy(), args.k, backend)
    t_search = time.perf_counter() - t0
    run = to_run(data.query_ids, data.doc_ids, scores, idx)
    ev = evaluate_run(data.qrels, run)
    counts = data.counts  # evaluate_run's skips are the same queries, already counted by load_beir
    result = {
        "dataset": name, "split": args.split, "model": args.model, "device": str(enc.device),
        "dtype": str(enc.dtype).replace("torch.", ""), "documents": len(data.doc_ids),
        "corpus": "full" if len(data.doc_ids) == full_docs else
                  f"subset: relevant + random (seed {args.seed}), {len(data.doc_ids)} of {full_docs}",
        "queries": ev.n_queries, **{m: round(ev.means[m], 5) for m in METRICS},
        "counts": {k: v for k, v in sorted(counts.items()) if v},
        "timing": {
            "load_s": round(t_load, 2), "tokenize_passages_s": round(t_tok, 2),
            "encode_passages_s": round(p_stats["seconds"], 2),
            "passages_per_s": round(p_stats["texts"] / p_stats["seconds"], 2),
            "passage_tokens": p_stats["tokens"],
            "passage_tokens_per_s": round(p_stats["tokens"] / p_stats["seconds"], 1),
            "encode_queries_s": round(q_stats["seconds"], 2), "search_s": round(t_search, 3),
            "search_backend": backend + ("-gpu" if backend == "faiss" and _faiss_gpus() else ""),
            "wall_s": None,
        },
        "token_budget": enc.token_budget, "max_len": enc.max_len, "threads": torch.get_num_threads(),
    }
    if args.hf_baseline:
        result["hf_baseline"] = hf_baseline(args, enc, doc_ids_tok[:args.hf_baseline], doc_emb[:args.hf_baseline])
    result["timing"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    if args.run_file:
        with open(args.run_file, "w") as f:
            for q in data.query_ids:
                for r, d in enumerate(rank(run[q])):
                    f.write(f"{q} Q0 {d} {r + 1} {run[q][d]:.6f} llara_fast\n")
    return result


def hf_baseline(args, enc, ids, ours) -> dict:
    """Time a padded HF forward on the first passages and compare its embeddings with ours."""
    from llara_fast.export import export

    # Our figure on exactly these passages, measured now (same machine state as the HF run).
    enc.encode_ids(ids, "passage")
    ours_stats = dict(enc.stats)
    with tempfile.TemporaryDirectory() as tmp:  # an export of exactly the weights we encode with
        src = export(enc.model, enc.tokenizer, Path(tmp) / "hf", prompts=enc.prompts, source=args.model)
        emb, real, padded, secs = hf_padded_encode(src, ids, enc.template, "passage", args.hf_batch_size)
    return {"passages": len(ids), "batch_size": args.hf_batch_size, "real_tokens": real, "padded_tokens": padded,
            "seconds": round(secs, 2), "real_tokens_per_s": round(real / secs, 1),
            "passages_per_s": round(len(ids) / secs, 2),
            "ours_same_passages_tokens_per_s": round(ours_stats["tokens"] / ours_stats["seconds"], 1),
            "ours_same_passages_per_s": round(len(ids) / ours_stats["seconds"], 2),
            "max_abs_diff_vs_ours": float((emb - ours).abs().max())}


def format_report(r: dict) -> str:
    t = r["timing"]
    rows = [("metric", "value"), ("nDCG@10", f"{r['ndcg@10']:.4f}"), ("MRR@10", f"{r['mrr@10']:.4f}"),
            ("Recall@100", f"{r['recall@100']:.4f}")]
    lines = [f"{r['dataset']} ({r['split']}), {r['model']}: {r['queries']} queries, {r['documents']} documents "
             f"({r.get('corpus', 'full')}), {r['device']} {r['dtype']}", _table(rows),
             f"passages: {t['encode_passages_s']:.1f}s, {t['passages_per_s']:.2f} passages/s, "
             f"{t['passage_tokens_per_s']:.0f} tokens/s ({t['passage_tokens']} tokens); queries "
             f"{t['encode_queries_s']:.1f}s; search {t['search_s']:.3f}s ({t['search_backend']}); "
             f"wall {t['wall_s']:.1f}s"]
    if "hf_baseline" in r:
        h = r["hf_baseline"]
        lines.append(f"HF padded forward on the first {h['passages']} passages: {h['real_tokens_per_s']:.0f} real tokens/s "
                     f"({h['real_tokens'] / h['padded_tokens']:.0%} of the padded batch is real), "
                     f"{h['passages_per_s']:.2f} passages/s; ours on the same passages "
                     f"{h['ours_same_passages_tokens_per_s']:.0f} tokens/s; max |HF - ours| = "
                     f"{h['max_abs_diff_vs_ours']:.2e}")
    for k, v in r["counts"].items():
        lines.append(f"note: {_WHY.get(k, k)}: {v}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="preset, HF directory (e.g. an export), .gguf file")
    ap.add_argument("--beir", required=True, help="BEIR dataset directory")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", help="also write the JSON result to this file")
    ap.add_argument("--run-file", help="write the ranking (TREC run format, top --k per query)")
    ap.add_argument("--k", type=int, default=DEFAULT_K, help="documents retrieved per query (>= 100)")
    ap.add_argument("--max-len", type=int, default=512, help="text tokens kept per passage / query")
    ap.add_argument("--token-budget", type=int, default=None, help="tokens per packed micro-batch")
    ap.add_argument("--device", default=None)
    ap.add_argument("--attn", default="auto")
    ap.add_argument("--hf-baseline", type=int, default=0, metavar="N",
                    help="also time a padded transformers forward on the first N passages")
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--max-docs", type=int, default=0, metavar="N",
                    help="quick comparisons: evaluate on a corpus of every relevant document plus random ones, "
                         "N in all (0: the full corpus); reported in the result")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --max-docs draw")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.k < 100:
        ap.error("--k must be at least 100 (Recall@100)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        result = run_evaluation(args)
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    line = json.dumps(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
