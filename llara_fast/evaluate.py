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
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel

from llara_fast.data.beir import REASONS, load_beir
from llara_fast.encode import Encoder
from llara_fast.errors import UserError
from llara_fast.io.export import ExportOptions, export

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
        raise UserError(f"unknown search backend {backend!r} (faiss or numpy)")
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
    t_start = time.perf_counter()
    data = load_beir(args.beir, args.split)
    full_docs = len(data.doc_ids)
    data = data.subset(args.max_docs, args.seed)
    name = Path(args.beir).name
    print(f"{name} ({args.split}): {len(data.doc_ids)} documents, {len(data.query_ids)} queries to evaluate",
          file=sys.stderr)
    if not data.doc_ids or not data.query_ids:
        raise UserError(f"{args.beir}: nothing to evaluate ({len(data.doc_ids)} documents, "
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
    # Our figure on exactly these passages, measured now (same machine state as the HF run).
    enc.encode_ids(ids, "passage")
    ours_stats = dict(enc.stats)
    with tempfile.TemporaryDirectory() as tmp:  # an export of exactly the weights we encode with
        src = export(enc.model, enc.tokenizer, Path(tmp) / "hf", enc.prompts, ExportOptions(source=args.model))
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
        lines.append(f"note: {REASONS.get(k, k)}: {v}")
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
    except UserError as e:
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
