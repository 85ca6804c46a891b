"""Dense hard negatives: mine a BEIR split's negatives with the model itself.

    python -m llara_fast.mine --beir DIR --model M [--split train] [--rank-range 30:200] [--k 15] \\
        [--embeddings EMB] --out pairs.jsonl [--overwrite]

The corpus is encoded as a passage (or read from ``--embeddings``, the shards of
``llara_fast.encode --corpus`` made by the same model), each query of the split as a query,
and the passages are ranked by inner product (exact, faiss). The negatives of a query are drawn
uniformly (seeded) from its hits at ranks LO+1..HI that are not positives (nor copies of a
positive's text): the window keeps the top hits, where unjudged relevant passages sit, out, as
the released LLaRA passage model's negatives came from a dense retriever's top 200. The output
is FlagEmbedding JSONL, which ``llara_fast.finetune --data.train`` reads as it reads BM25 pairs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

import numpy as np

from llara_fast.data.pairs import MINED_NEGATIVES, Ranker, beir_to_pairs, check_out, parse_rank_range, write_pairs
from llara_fast.encode import Encoder, read_embeddings
from llara_fast.errors import UserError
from llara_fast.evaluate import search

DEFAULT_RANGE = "30:200"


def dense_ranker(enc: Encoder, embeddings: str | None = None, progress: bool = True,
                 corpus: str | os.PathLike | None = None) -> Ranker:
    """A Ranker of beir_to_pairs: exact inner-product search with the encoder's embeddings
    (precomputed ones are checked against ``corpus``, the file they must have been made from)."""

    def rank(doc_ids: list[str], doc_texts: list[str], query_texts: list[str], depth: int) -> list[list[int]]:
        if embeddings:
            docs = _read_embeddings(embeddings, enc, doc_ids, corpus)
        else:
            docs = enc.encode_passages(doc_texts, progress=progress).numpy()  # (D, d)
        queries = enc.encode_queries(query_texts, progress=progress).numpy()  # (Q, d)
        _, idx = search(docs, queries, depth)  # (Q, depth), best first
        return idx.tolist()

    return rank


def _read_embeddings(path: str, enc: Encoder, doc_ids: list[str], corpus=None) -> np.ndarray:
    ids, emb, _ = read_embeddings(path, enc, corpus)
    row = {d: i for i, d in enumerate(ids)}
    missing = [d for d in doc_ids if d not in row]
    if missing:
        raise UserError(f"{path}: no embedding for {len(missing)} corpus documents (e.g. {missing[0]!r})")
    return emb[[row[d] for d in doc_ids]]  # (D, d) in the corpus order of the BEIR loader


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beir", required=True, help="BEIR dataset directory")
    ap.add_argument("--model", required=True, help="preset, HF directory (e.g. an export), .gguf, training checkpoint "
                    "or Hub model id ORG/NAME")
    ap.add_argument("--revision", default="main", help="branch, tag or commit of a Hub model id (default main)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--rank-range", default=DEFAULT_RANGE, help=f"LO:HI, the ranks LO+1..HI (default {DEFAULT_RANGE})")
    ap.add_argument("--k", type=int, default=MINED_NEGATIVES, help=f"negatives per query (default {MINED_NEGATIVES})")
    ap.add_argument("--seed", type=int, default=0, help="of the draw inside the window")
    ap.add_argument("--embeddings", help="corpus embeddings of `llara_fast.encode --corpus` (same model)")
    ap.add_argument("--max-len", type=int, default=512, help="text tokens kept per passage / query")
    ap.add_argument("--attn", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out", required=True, help="output JSONL (FlagEmbedding format)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    counts: Counter = Counter()
    try:
        window = parse_rank_range(a.rank_range)
        check_out(a.out, a.overwrite)
        enc = Encoder.from_pretrained(a.model, attn_backend=a.attn, revision=a.revision, max_len=a.max_len,
                                      device=a.device)
        records = beir_to_pairs(a.beir, a.split, dense_ranker(enc, a.embeddings, not a.quiet, os.path.join(a.beir, "corpus.jsonl")), a.k, a.seed, counts,
                                window)
        write_pairs(records, a.out)
    except UserError as e:
        print(f"mine: error: {e}", file=sys.stderr)
        return 2
    summary = " ".join(f"{k}={v}" for k, v in sorted(counts.items()) if v)
    print(f"mine: {len(records)} records (dense, ranks {window[0] + 1}..{window[1]}, k={a.k}) -> {a.out} in "
          f"{time.perf_counter() - t0:.1f}s; {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
