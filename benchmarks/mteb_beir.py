"""MTEB on a local BEIR-format dataset, offline: the route people use to compare embedders,
applied to an llara_fast export through sentence-transformers.

    python benchmarks/mteb_beir.py --model RUN/export --beir ../shared/data/beir/scifact [--max-docs N]

The export loads as ``SentenceTransformer(DIR, trust_remote_code=True)``; MTEB's wrapper calls
``encode_query`` for queries and ``encode_document`` for passages, so the LLaRA prompts apply.
The dataset is read by llara_fast's BEIR loader (the same passages, ``title + " " + text``,
the same bad-input rules and the same ``--max-docs`` subset as ``llara_fast.evaluate``) and
handed to an MTEB retrieval task whose ``load_data`` returns it: nothing is downloaded
(mteb's own loader would fetch the dataset from the Hugging Face Hub). Prints MTEB's main
scores and one JSON line; ``--out`` also writes it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from llara_fast.data.beir import load_beir  # noqa: E402

try:  # optional: pip install 'llara-fast[mteb]' (scripts/setup.sh installs it)
    import mteb
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata
except ImportError:
    mteb = None


def local_task(beir_dir: str, split: str = "test", max_docs: int = 0, seed: int = 0):
    """An MTEB retrieval task over a local BEIR directory (no Hub access)."""
    data = load_beir(beir_dir, split).subset(max_docs, seed)
    name = Path(beir_dir).name

    class LocalBeir(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=f"Local{name.capitalize()}", description=f"{name} ({split}) read from {beir_dir}",
            dataset={"path": str(beir_dir), "revision": "local"},  # never fetched: load_data below
            type="Retrieval", category="t2t", modalities=["text"], eval_splits=[split],
            eval_langs=["eng-Latn"], main_score="ndcg_at_10")

        def load_data(self, num_proc=None, **kwargs):
            # The passage is already joined; an empty title makes MTEB encode exactly it.
            corpus = Dataset.from_dict({"id": data.doc_ids, "title": [""] * len(data.doc_ids),
                                        "text": data.doc_texts})
            queries = Dataset.from_dict({"id": data.query_ids, "text": data.query_texts})
            qrels = {q: dict(data.qrels[q]) for q in data.query_ids}
            self.dataset = {"default": {split: {"corpus": corpus, "queries": queries, "relevant_docs": qrels,
                                                "top_ranked": None}}}
            self.data_loaded = True

    return LocalBeir(), data


def run(model_dir: str, beir_dir: str, split: str = "test", max_docs: int = 0, batch_size: int = 16) -> dict:
    from sentence_transformers import SentenceTransformer

    if mteb is None:
        raise SystemExit("mteb is not installed: pip install 'llara-fast[mteb]' (or pip install mteb)")
    model = SentenceTransformer(model_dir, trust_remote_code=True, device="cpu" if not _cuda() else None)
    seen: Counter = Counter()  # which prompt each text got: MTEB must pass query / document
    preprocess = model[0].preprocess

    def counted(inputs, *a, task=None, **kw):
        seen[task or "none"] += len(inputs)
        return preprocess(inputs, *a, task=task, **kw)

    model[0].preprocess = counted
    task, data = local_task(beir_dir, split, max_docs)
    t0 = time.perf_counter()
    res = mteb.evaluate(model, tasks=[task], cache=None, encode_kwargs={"batch_size": batch_size},
                        show_progress_bar=False)
    scores = res.task_results[0].scores[split][0]
    return {"dataset": Path(beir_dir).name, "split": split, "model": model_dir, "documents": len(data.doc_ids),
            "queries": len(data.query_ids), "ndcg@10": scores["ndcg_at_10"], "mrr@10": scores["mrr_at_10"],
            "recall@100": scores["recall_at_100"], "texts_by_task": dict(seen), "mteb": mteb.__version__,
            "seconds": round(time.perf_counter() - t0, 1)}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an llara_fast export (HF + sentence-transformers directory)")
    ap.add_argument("--beir", required=True, help="BEIR dataset directory")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-docs", type=int, default=0, help="the --max-docs subset of llara_fast.evaluate")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", help="also write the JSON result here")
    a = ap.parse_args(argv)
    r = run(a.model, a.beir, a.split, a.max_docs, a.batch_size)
    print(f"MTEB {r['mteb']} on {r['dataset']} ({r['split']}, {r['documents']} documents, {r['queries']} queries): "
          f"nDCG@10 {r['ndcg@10']:.4f}, MRR@10 {r['mrr@10']:.4f}, Recall@100 {r['recall@100']:.4f} "
          f"({r['seconds']}s; texts by task: {r['texts_by_task']})", file=sys.stderr)
    line = json.dumps(r)
    if a.out:
        Path(a.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
