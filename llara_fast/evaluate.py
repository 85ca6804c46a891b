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
from llara_fast.encode import Encoder, read_embeddings
from llara_fast.errors import UserError
from llara_fast.io.export import ExportOptions, export

try:  # faiss-cpu (requirements.txt) or faiss-gpu (pip install 'llara-fast[gpu]')
    import faiss
except ImportError:
    faiss = None

METRICS = ("ndcg@10", "mrr@10", "recall@100")  # the BEIR report; MS MARCO's: mrr@10, recall@1000
DEFAULT_K = 100
METRIC_FUNCS = {}  # name -> f(ranking, rels, k), filled below


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


METRIC_FUNCS.update(ndcg=ndcg_at_k, mrr=mrr_at_k, recall=recall_at_k)


def parse_metric(name: str) -> tuple[str, int]:
    """'ndcg@10' -> ('ndcg', 10); names: ndcg, mrr, recall, each at a cutoff k >= 1."""
    base, _, k = name.strip().lower().partition("@")
    if base not in METRIC_FUNCS or not k.isdigit() or int(k) < 1:
        raise UserError(f"unknown metric {name!r}: use ndcg@K, mrr@K or recall@K (e.g. ndcg@10,recall@1000)")
    return base, int(k)


@dataclass
class Evaluation:
    means: dict[str, float]               # metric -> mean over evaluated queries
    per_query: dict[str, dict[str, float]]
    counts: Counter = field(default_factory=Counter)

    @property
    def n_queries(self) -> int:
        return len(self.per_query)


def evaluate_run(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
                 metrics: tuple[str, ...] = METRICS) -> Evaluation:
    """Score a run {query: {doc: score}} against qrels {query: {doc: judgement}}."""
    parsed = [(m, *parse_metric(m)) for m in metrics]
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
        per_query[q] = {m: METRIC_FUNCS[base](ranking, rels, k) for m, base, k in parsed}
    counts["run_queries_without_qrels"] = sum(1 for q in run if q not in qrels)
    means = {m: (sum(v[m] for v in per_query.values()) / len(per_query) if per_query else float("nan"))
             for m in metrics}
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


INDEXES = ("flat", "hnsw", "ivf", "ivfpq")


@dataclass(frozen=True)
class IndexConfig:
    """A faiss index over the corpus; 0 = the default for the corpus size N and dim d."""
    kind: str = "flat"     # flat: exact (IndexFlatIP); hnsw, ivf, ivfpq: approximate
    nlist: int = 0         # ivf*: inverted lists (4·sqrt(N), at most N/39 so each list trains on 39 points)
    nprobe: int = 0        # ivf*: lists visited per query (max(32, nlist/8), at most nlist)
    hnsw_m: int = 32       # hnsw: links per node
    ef_search: int = 0     # hnsw: search breadth (max(128, 2k))
    pq_m: int = 0          # ivfpq: sub-quantizers of 8 bits (the largest divisor of d up to min(64, d/4))
    seed: int = 0          # of the training sample


def build_index(doc_emb: np.ndarray, cfg: IndexConfig, k: int):
    """(faiss index with doc_emb added, its resolved parameters)."""
    if faiss is None:
        raise UserError("faiss is not installed: pip install faiss-cpu (or 'llara-fast[gpu]')")
    if cfg.kind not in INDEXES:
        raise UserError(f"unknown index {cfg.kind!r} ({', '.join(INDEXES)})")
    n, d = doc_emb.shape
    ip = faiss.METRIC_INNER_PRODUCT
    params: dict = {"kind": cfg.kind}
    if cfg.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, ip)
        index.hnsw.efSearch = cfg.ef_search or max(128, 2 * k)
        params.update(m=cfg.hnsw_m, ef_search=index.hnsw.efSearch)
    else:
        nlist = cfg.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(d)
        if cfg.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
        else:
            pq_m = cfg.pq_m or max(m for m in range(1, min(64, max(1, d // 4)) + 1) if d % m == 0)
            if d % pq_m:
                raise UserError(f"--pq-m {pq_m} does not divide the embedding dim {d}")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, 8, ip)
            params["pq_m"] = pq_m
        if cfg.kind == "ivfpq" and n < 256:
            raise UserError(f"--index ivfpq needs at least 256 documents to train its 8-bit codebooks; this corpus has "
                            f"{n}: use --index ivf or flat")
        rng = np.random.default_rng(cfg.seed)
        train = doc_emb if n <= 256 * nlist else doc_emb[np.sort(rng.choice(n, 256 * nlist, replace=False))]
        try:
            index.train(train)
        except RuntimeError as e:
            raise UserError(f"--index {cfg.kind}: faiss could not train it on {len(train)} vectors "
                            f"({str(e).splitlines()[0]})") from None
        index.nprobe = min(nlist, cfg.nprobe or max(32, nlist // 8))
        params.update(nlist=nlist, nprobe=index.nprobe)
    if cfg.kind != "hnsw" and _faiss_gpus() > 0:  # faiss has no GPU HNSW
        index = faiss.index_cpu_to_all_gpus(index)
        params["gpu"] = True
    index.add(doc_emb)
    return index, params


def search_index(doc_emb: np.ndarray, query_emb: np.ndarray, k: int, cfg: IndexConfig = IndexConfig()):
    """(scores (Q, k), indices (Q, k), info) through the index of ``cfg``; for an approximate index,
    info holds its recall@100 against exact search (the overlap of the top-100 sets)."""
    doc_emb = np.ascontiguousarray(doc_emb, dtype=np.float32)
    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
    k = min(k, doc_emb.shape[0])
    t0 = time.perf_counter()
    index, info = build_index(doc_emb, cfg, k)
    t1 = time.perf_counter()
    scores, idx = index.search(query_emb, k)
    info.update(build_s=round(t1 - t0, 3), search_s=round(time.perf_counter() - t1, 3))
    if cfg.kind != "flat":
        _, exact = search(doc_emb, query_emb, min(100, k))
        info["recall@100_vs_exact"] = round(overlap_recall(idx, exact), 5)
    return scores, idx, info


def overlap_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx top-n ∩ exact top-n| / n, n = exact's width."""
    n = exact.shape[1]
    return float(np.mean([len(set(a[:n].tolist()) & set(e.tolist())) / n for a, e in zip(approx, exact)]))


def to_run(query_ids: list[str], doc_ids: list[str], scores: np.ndarray, idx: np.ndarray) -> dict:
    return {q: {doc_ids[j]: float(s) for s, j in zip(scores[i], idx[i]) if j >= 0}
            for i, q in enumerate(query_ids)}


def evaluate_encoder(enc: Encoder, data, metrics: tuple[str, ...] = METRICS, k: int = DEFAULT_K) -> Evaluation:
    """Encode a loaded BEIR split (llara_fast.data.beir.BeirData) with ``enc`` and score its
    ranking: exact inner-product search (faiss, numpy without it). Fine-tuning's evaluation."""
    doc_emb = enc.encode(data.doc_texts, "passage").numpy()
    q_emb = enc.encode(data.query_texts, "query").numpy()
    scores, idx = search(doc_emb, q_emb, k, "faiss" if faiss is not None else "numpy")
    return evaluate_run(data.qrels, to_run(data.query_ids, data.doc_ids, scores, idx), metrics)


# ---- the HF padded baseline (speed reference) ------------------------------------------------
def hf_padded_encode(model_dir, ids: list[list[int]], template, kind: str = "passage",
                     batch_size: int = 16):
    """Embeddings of pre-tokenised texts through transformers' AutoModel the way the released
    LLaRA code runs it: batches in the given order, left-padded to the longest (multiple of 8),
    SDPA attention, fp32 on CPU (pooled in fp32 at least). ``model_dir``: an HF directory, or an AutoModel
    already loaded.
    Returns (embeddings (n, d), real tokens, padded tokens, seconds)."""
    model = model_dir if isinstance(model_dir, torch.nn.Module) else AutoModel.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
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
            states = hidden[:, -K:]  # (B, K, d)
            out.append(F.normalize(states.to(torch.promote_types(states.dtype, torch.float32)).mean(1), dim=-1))
            real += sum(map(len, rows))
            padded += inp.numel()
    return torch.cat(out), real, padded, time.perf_counter() - t0


# ---- CLI -------------------------------------------------------------------------------------
def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def run_evaluation(args) -> dict:
    t_start = time.perf_counter()
    metrics = tuple(m.strip().lower() for m in args.metrics.split(",") if m.strip())
    deepest = max((parse_metric(m)[1] for m in metrics), default=0)
    if not metrics or deepest > args.k:
        raise UserError(f"--metrics {args.metrics!r} needs --k >= {deepest} documents per query, --k is {args.k}"
                        if metrics else "--metrics names no metric")
    data = load_beir(args.beir, args.split, with_corpus=not args.embeddings)
    full_docs = len(data.doc_ids)
    data = data.subset(args.max_docs, args.seed)
    name = Path(args.beir).name
    t0 = time.perf_counter()
    enc = Encoder.from_pretrained(args.model, attn_backend=args.attn, revision=args.revision, max_len=args.max_len,
                                  token_budget=args.token_budget, device=args.device)
    t_load = time.perf_counter() - t0
    doc_ids, doc_emb, p_stats, counts = corpus_side(args, enc, data)
    print(f"{name} ({args.split}): {len(doc_ids)} documents, {len(data.query_ids)} queries to evaluate",
          file=sys.stderr)
    if not doc_ids or not data.query_ids:
        why = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v and (k.startswith("quer") or
                                                                             k.startswith("corpus")))
        raise UserError(f"{args.beir}: nothing to evaluate ({len(doc_ids)} documents, "
                        f"{len(data.query_ids)} queries with relevant documents" + (f"; skipped: {why}" if why else "")
                        + ")")
    q_emb = enc.encode(data.query_texts, "query", progress=not args.quiet)
    q_stats = dict(enc.stats)
    cfg = IndexConfig(args.index, args.nlist, args.nprobe, ef_search=args.ef_search, pq_m=args.pq_m, seed=args.seed)
    if faiss is None and cfg.kind == "flat":
        t0 = time.perf_counter()
        scores, idx = search(doc_emb, q_emb.numpy(), args.k, "numpy")
        index_info = {"kind": "flat", "backend": "numpy", "search_s": round(time.perf_counter() - t0, 3)}
    else:
        scores, idx, index_info = search_index(doc_emb, q_emb.numpy(), args.k, cfg)
    run = to_run(data.query_ids, doc_ids, scores, idx)
    ev = evaluate_run(data.qrels, run, metrics)
    result = {
        "dataset": name, "split": args.split, "model": args.model, "device": str(enc.device),
        "dtype": str(enc.dtype).replace("torch.", ""), "documents": len(doc_ids),
        "corpus": (f"embeddings: {args.embeddings}" if args.embeddings else "full" if len(doc_ids) == full_docs
                   else f"subset: relevant + random (seed {args.seed}), {len(doc_ids)} of {full_docs}"),
        "queries": ev.n_queries, "metrics": list(metrics), **{m: round(ev.means[m], 5) for m in metrics},
        "index": index_info, "counts": {k: v for k, v in sorted(counts.items()) if v},
        "timing": {
            "load_s": round(t_load, 2), **p_stats,
            "encode_queries_s": round(q_stats["seconds"], 2), "search_s": index_info["search_s"],
            "search_backend": "numpy" if faiss is None else "faiss" + ("-gpu" if index_info.get("gpu") else ""),
            "wall_s": None,
        },
        "token_budget": enc.token_budget, "max_len": enc.max_len, "threads": torch.get_num_threads(),
    }
    if args.hf_baseline:
        if args.embeddings:
            raise UserError("--hf-baseline times the passage encoding, which --embeddings skips")
        ids = enc.tokenize(data.doc_texts[:args.hf_baseline])
        result["hf_baseline"] = hf_baseline(args, enc, ids, torch.from_numpy(doc_emb[:args.hf_baseline]))
    result["timing"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    if args.run_file:
        write_run_file(args.run_file, data.query_ids, run)
    return result


def corpus_side(args, enc: Encoder, data) -> tuple[list[str], np.ndarray, dict, Counter]:
    """(document ids, (N, d) float32 embeddings, timing, counts): encoded now, or read from
    --embeddings (made by `llara_fast.encode --corpus` with this model's weights and prompts)."""
    counts = Counter(data.counts)  # evaluate_run's skips are the same queries, already counted by load_beir
    if not args.embeddings:
        t0 = time.perf_counter()
        ids_tok = enc.tokenize(data.doc_texts)
        t_tok = time.perf_counter() - t0
        emb = enc.encode_ids(ids_tok, "passage", progress=not args.quiet)
        st = enc.stats
        return data.doc_ids, emb.numpy(), {
            "tokenize_passages_s": round(t_tok, 2), "encode_passages_s": round(st["seconds"], 2),
            "passages_per_s": round(st["texts"] / st["seconds"], 2), "passage_tokens": st["tokens"],
            "passage_tokens_per_s": round(st["tokens"] / st["seconds"], 1)}, counts
    if args.max_docs:
        raise UserError("--max-docs draws a subset of the corpus it encodes; --embeddings brings its own corpus")
    t0 = time.perf_counter()
    doc_ids, emb, emb_counts = read_embeddings(args.embeddings, enc, Path(args.beir) / "corpus.jsonl")
    counts.update(emb_counts)
    return doc_ids, emb, {"read_embeddings_s": round(time.perf_counter() - t0, 2)}, counts


def write_run_file(path: str | os.PathLike, query_ids: list[str], run: dict) -> None:
    """The ranking in TREC run format ("qid Q0 docid rank score tag"), in our tie order (ties by
    document id ascending). trec_eval sorts by score and breaks ties the other way, so a tied
    score is written one float step below the one before it: trec_eval then reads our order."""
    with open(path, "w") as f:
        for q in query_ids:
            prev = math.inf
            for r, d in enumerate(rank(run[q])):
                score = run[q][d] if run[q][d] < prev else math.nextafter(prev, -math.inf)
                f.write(f"{q} Q0 {d} {r + 1} {score!r} llara_fast\n")
                prev = score


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


def _metric_label(m: str) -> str:
    base, k = parse_metric(m)
    return f"{ {'ndcg': 'nDCG', 'mrr': 'MRR', 'recall': 'Recall'}[base]}@{k}"


def format_report(r: dict) -> str:
    t = r["timing"]
    rows = [("metric", "value")] + [(_metric_label(m), f"{r[m]:.4f}") for m in r.get("metrics", METRICS)]
    ix = r.get("index", {"kind": "flat"})
    if "recall@100_vs_exact" in ix:
        rows.append((f"recall@100 of {ix['kind']} vs exact", f"{ix['recall@100_vs_exact']:.4f}"))
    passages = (f"passages: {t['encode_passages_s']:.1f}s, {t['passages_per_s']:.2f} passages/s, "
                f"{t['passage_tokens_per_s']:.0f} tokens/s ({t['passage_tokens']} tokens)"
                if "encode_passages_s" in t else f"passages: read in {t['read_embeddings_s']:.1f}s")
    params = ", ".join(f"{k} {v}" for k, v in ix.items() if k not in ("kind", "build_s", "search_s",
                                                                      "recall@100_vs_exact"))
    lines = [f"{r['dataset']} ({r['split']}), {r['model']}: {r['queries']} queries, {r['documents']} documents "
             f"({r.get('corpus', 'full')}), {r['device']} {r['dtype']}", _table(rows),
             f"{passages}; queries {t['encode_queries_s']:.1f}s; search {t['search_s']:.3f}s "
             f"({t['search_backend']} {ix['kind']}{f': {params}' if params else ''}); wall {t['wall_s']:.1f}s"]
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
    ap.add_argument("--model", required=True, help="preset, HF directory (e.g. an export), .gguf file, training "
                    "checkpoint or Hub model id ORG/NAME (HF cache; downloaded unless HF_HUB_OFFLINE is set)")
    ap.add_argument("--revision", default="main", help="branch, tag or commit of a Hub model id (default main)")
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
                    help="quick comparisons: evaluate on a corpus of N documents in all (0: the full corpus): the "
                         "relevant documents of the evaluated queries count toward N (queries whose relevant "
                         "documents do not fit are left out, said in a note), random ones fill the rest; "
                         "reported in the result")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --max-docs draw")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--metrics", default=",".join(METRICS),
                    help="comma-separated ndcg@K, mrr@K, recall@K (MS MARCO: mrr@10,recall@1000 with --k 1000)")
    ap.add_argument("--embeddings", metavar="DIR",
                    help="corpus embeddings from `llara_fast.encode --corpus` (the corpus is then not encoded)")
    ap.add_argument("--index", default="flat", choices=INDEXES,
                    help="faiss index: flat (exact, default) or approximate hnsw / ivf / ivfpq, whose recall@100 "
                         "against exact search is reported")
    ap.add_argument("--nlist", type=int, default=0, help="ivf*: inverted lists (0: 4*sqrt(N), at most N/39)")
    ap.add_argument("--nprobe", type=int, default=0, help="ivf*: lists searched (0: max(32, nlist/8))")
    ap.add_argument("--ef-search", type=int, default=0, help="hnsw: search breadth (0: max(128, 2k))")
    ap.add_argument("--pq-m", type=int, default=0, help="ivfpq: sub-quantizers (0: largest divisor of d <= 64)")
    args = ap.parse_args(argv)
    if args.k < 1:
        ap.error("--k must be at least 1")
    try:
        if args.out:  # an --out we cannot write is found before the evaluation, not after it
            check_writable(Path(args.out))
        if args.run_file:
            check_writable(Path(args.run_file))
        result = run_evaluation(args)
        print(format_report(result))
        line = json.dumps(result)
        if args.out:
            Path(args.out).write_text(line + "\n")
    except UserError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"evaluate: error: {e.filename or args.out}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 1
    print(line)
    return 0


def check_writable(path: Path) -> None:
    """One line now, instead of a traceback after the work, when ``path`` cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path.parent}: cannot create it ({e.strerror or e})") from None
    target = path if path.exists() else path.parent
    if not os.access(target, os.W_OK):
        raise UserError(f"{path}: cannot write there (permission denied)")


if __name__ == "__main__":
    sys.exit(main())
