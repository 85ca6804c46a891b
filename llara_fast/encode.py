"""Packed, unpadded encoding (DESIGN §1 "Encoder use").

passage -> PREFIX text SUM, embedding = mean of the final-normed hidden states at <s1>..<sK>;
query   -> PREFIX text PRED, mean over <s9>..<s(8+K)>; both L2-normalised, fp32.

Texts are tokenised once, sorted by length and packed back to back into micro-batches of at
most ``token_budget`` tokens (one causal segment per text, no padding); results come back in
input order. Works on CPU (fp32) and GPU (bf16 by default), from a preset, an HF directory
(e.g. an export of llara_fast.export, whose recorded prompts are used), a .gguf file or a
training checkpoint (llara_fast.io.load).

    python -m llara_fast.encode                       # similarity of Wikipedia passages
    python -m llara_fast.encode --model DIR --text "a passage" --text "another"
    torchrun --nproc_per_node K -m llara_fast.encode --model M --corpus corpus.jsonl --out DIR

With --corpus (a BEIR corpus.jsonl: {"_id", "title", "text"}, passage = title + " " + text),
the corpus is streamed and encoded in shards of --shard-size lines, each rank its share
(shard i -> rank i % K), never more than one shard's texts in memory; DIR is laid out as
llara_fast.io.embeddings describes. Rerunning the same command encodes only the shards that
are missing (after a crash or kill); ``llara_fast.evaluate --embeddings DIR`` searches them.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from llara_fast.config import dtype_arg, dtype_name
from llara_fast.data.beir import REASONS, corpus_doc
from llara_fast.data.packing import greedy_groups, pack_encode_reference
from llara_fast.data.shards import tokenizer_fingerprint
from llara_fast.data.sources import iter_wiki_sample
from llara_fast.errors import UserError
from llara_fast.io.embeddings import DTYPES, EmbeddingShards, corpus_identity
from llara_fast.io.load import load
from llara_fast.io.lock import DirLock
from llara_fast.runtime import tune_cpu_malloc
from llara_fast.templates import PromptConfig, Template

# Tokens per micro-batch. On CPU, small batches keep activations in cache and avoid the page
# faults of large fresh allocations (measured in benchmarks/results/); on GPU, large ones fill it.
DEFAULT_TOKEN_BUDGET = {"cpu": 2048, "cuda": 32768}


class Encoder:
    def __init__(self, model, tokenizer, prompts: PromptConfig = PromptConfig(), max_len: int = 512,
                 token_budget: int | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":
            tune_cpu_malloc()
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.template = Template.from_tokenizer(tokenizer, prompts)
        self.max_len = max_len
        self.token_budget = token_budget or DEFAULT_TOKEN_BUDGET.get(self.device.type, 8192)
        # Figures of the last encode() call: texts, tokens (real, prompts included), seconds.
        self.stats: dict[str, float] = {}

    @classmethod
    def from_pretrained(cls, spec: str, attn_backend: str = "auto", revision: str = "main", **kw) -> "Encoder":
        """spec: preset, HF directory, .gguf file, training checkpoint or Hub model id (at
        ``revision``). An HF directory written by llara_fast.export brings its prompts (unless
        ``prompts=`` is given)."""
        model, tok, prompts = load(spec, attn_backend=attn_backend, revision=revision)
        kw.setdefault("prompts", prompts)
        return cls(model, tok, **kw)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Text token ids, no special tokens, cut to max_len (the prompt pieces come on top)."""
        if len(texts) == 0:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False, truncation=True,
                              max_length=self.max_len)["input_ids"]

    def suffix_len(self, kind: str) -> int:
        return len(self.template.prefix_ids) + len(self.template.sum_ids if kind == "passage"
                                                   else self.template.pred_ids)

    @torch.inference_mode()
    def encode_ids(self, ids: Sequence[Sequence[int]], kind: str = "passage", progress: bool = False,
                   desc: str | None = None, bar=None) -> torch.Tensor:
        """(len(ids), d) fp32 unit vectors for pre-tokenised texts, in input order; ``bar``: a
        caller's tqdm bar to advance per micro-batch instead of one of its own."""
        if kind not in ("passage", "query"):
            raise UserError(f"kind must be 'passage' or 'query', got {kind!r}")
        out = torch.empty(len(ids), self.model.args.dim, dtype=torch.float32)
        lengths = [self.suffix_len(kind) + min(len(t), self.max_len) for t in ids]
        # Sorted by length: similar lengths share a micro-batch (steadier batch cost on GPU).
        order = sorted(range(len(ids)), key=lambda i: lengths[i])
        if ids and lengths[order[-1]] > self.token_budget:
            raise UserError(f"text {order[-1]} needs {lengths[order[-1]]} tokens with the prompt pieces, more than the "
                            f"token budget {self.token_budget}: raise the token budget or lower max_len")
        own = bar is None
        if own:
            bar = _progress(len(ids), desc or ("encode passages" if kind == "passage" else "encode queries"), progress)
        t0, done_tokens = time.perf_counter(), 0
        for g in greedy_groups([lengths[i] for i in order], self.token_budget):
            sel = [order[j] for j in g]
            batch, special = pack_encode_reference([ids[i] for i in sel], self.template, kind, self.max_len)
            hidden = self.model(batch.to(self.device))  # (N, d)
            emb = hidden[special.to(self.device)]  # (E, K, d)
            emb = emb.to(torch.promote_types(emb.dtype, torch.float32)).mean(1)  # (E, d), fp32 at least
            out[sel] = F.normalize(emb, dim=-1).float().cpu()  # one rounding to fp32 at the end
            done_tokens += batch.num_tokens
            bar.update(len(sel))
            bar.set_postfix_str(f"{done_tokens / (time.perf_counter() - t0):.0f} tok/s", refresh=False)
        if own:
            bar.close()
        bad = (~torch.isfinite(out).all(dim=1)).nonzero().flatten()  # (n_bad,): one check per call
        if len(bad):
            raise UserError(f"{len(bad)} of {len(ids)} embeddings are not finite (NaN/inf; e.g. text {int(bad[0])}): "
                            "the model's computation overflowed; nothing was written")
        self.stats = {"texts": len(ids), "tokens": sum(lengths), "seconds": time.perf_counter() - t0}
        return out

    def encode(self, texts: Sequence[str], kind: str = "passage", progress: bool = False) -> torch.Tensor:
        """(len(texts), d) fp32 unit vectors, in input order."""
        return self.encode_ids(self.tokenize(texts), kind, progress)

    def encode_passages(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        return self.encode(texts, "passage", progress)

    def encode_queries(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        return self.encode(texts, "query", progress)


# ---- a corpus, in shards, on any number of ranks ------------------------------------------------
def model_identity(enc: Encoder) -> dict:
    """What makes two encoders give the same embeddings: the weights (a hash of each parameter's
    float64 sum, 8 significant digits, so the same weights hash the same on any device), the
    tokenizer, the prompts, the text cap and the compute dtype."""
    h = hashlib.sha256()
    for name, p in sorted(enc.model.named_parameters()):
        h.update(f"{name}:{tuple(p.shape)}:{float(p.detach().double().sum()):.8g};".encode())
    return {"weights": h.hexdigest()[:32], "tokenizer": tokenizer_fingerprint(enc.tokenizer),
            "prompts": [enc.prompts.prefix, enc.prompts.sum_string()], "max_len": enc.max_len,
            "compute_dtype": str(enc.dtype).replace("torch.", ""), "dim": enc.model.args.dim}


def read_embeddings(path: str, enc: Encoder, corpus: str | os.PathLike | None = None
                    ) -> tuple[list[str], np.ndarray, Counter]:
    """(ids, (n, d) float32 vectors, counts) of `encode --corpus` shards, refused when another
    model made them (weights, tokenizer, prompts or dim differ) or, given the corpus file they
    stand for, when that file is not the one encoded (size, lines, sha256); a different text cap or
    compute dtype is only counted (e.g. bf16 shards from a GPU, queries on a CPU)."""
    store = EmbeddingShards(path)
    manifest = store.manifest()
    if corpus is not None and manifest is not None:
        encoded, now = manifest.get("corpus", {}), corpus_identity(corpus)
        diff = [k for k in ("bytes", "lines", "sha256") if encoded.get(k) != now[k]]
        if diff:
            raise UserError(f"{path}: encoded from another corpus than {corpus} ({', '.join(diff)} differ: "
                            f"{encoded.get(diff[0])} there, {now[diff[0]]} now); encode this corpus again")
    ids, emb, counts = store.read()
    made_by, now = store.manifest()["model"], model_identity(enc)
    for key in ("weights", "tokenizer", "prompts", "dim"):
        if made_by.get(key) != now.get(key):
            raise UserError(f"{path}: made by another model ({key} differs); encode the corpus with this model")
    for key in ("max_len", "compute_dtype"):
        if made_by.get(key) != now.get(key):
            counts[f"embeddings_{key}_{made_by.get(key)}_queries_{now.get(key)}"] += 1
    return ids, emb, counts


MAX_SHARD_LINES = 10_000


def auto_shard_size(lines: int, world: int) -> int:
    """Corpus lines per shard when none is given: about 4 shards per rank (every rank busy, a kill
    loses a quarter of a rank's share at most), at most MAX_SHARD_LINES. It depends on the number
    of ranks: rerun with the same number (or pass --shard-size) to resume a directory."""
    return max(1, min(MAX_SHARD_LINES, -(-lines // (4 * world))))


@dataclass(frozen=True)
class CorpusJob:
    corpus: str
    out: str
    shard_size: int = 0  # 0: auto_shard_size
    dtype: str = "float32"       # of the stored vectors: float32 or float16 (half the disk)
    overwrite: bool = False
    progress: bool = True


def encode_corpus(enc: Encoder, job: CorpusJob, rank: int = 0, world: int = 1) -> dict:
    """Encode this rank's shards of the corpus that are not done yet; rank 0 then marks the
    directory complete (all ranks must call it). Returns this rank's figures."""
    if job.shard_size < 0:
        raise UserError(f"shard size must be >= 1 (0: from the corpus and the ranks), got {job.shard_size}")
    job = dataclasses.replace(job, dtype=dtype_name(job.dtype, tuple(DTYPES), "embedding dtype"))  # fp16 or float16
    ident = corpus_identity(job.corpus)
    if job.shard_size == 0:  # every rank gets work whatever the corpus size: about 4 shards per rank
        job = dataclasses.replace(job, shard_size=auto_shard_size(ident["lines"], world))
    manifest = {"kind": "passage", "model": model_identity(enc), "corpus": {"name": os.path.basename(job.corpus),
                **ident}, "shard_size": job.shard_size, "dtype": job.dtype, "dim": enc.model.args.dim}
    store = EmbeddingShards(job.out)
    lock = DirLock(job.out, "embedding directory") if rank == 0 else None  # a second encode on it fails at once
    try:
        if rank == 0:
            store.start(manifest, job.overwrite)
        _barrier(world)
        store.check(manifest)
        return _encode_corpus(enc, job, store, ident, rank, world)
    finally:
        if lock is not None:
            lock.release()


def _encode_corpus(enc: Encoder, job: CorpusJob, store: EmbeddingShards, ident: dict, rank: int, world: int) -> dict:
    n_shards = -(-ident["lines"] // job.shard_size)
    mine = [i for i in range(rank, n_shards, world)]
    todo = []
    for i in mine:  # not written yet, or written and damaged since (checked against the marker)
        why = store.damage(i) if store.done(i) else "new"
        if why != "new" and why is not None:
            print(f"encode: {job.out}: shard {i} is damaged ({why}); encoding it again", file=sys.stderr, flush=True)
            store.forget(i)
        if why is not None:
            todo.append(i)
    bar = _progress(sum(min(job.shard_size, ident["lines"] - i * job.shard_size) for i in todo),
                    f"encode {os.path.basename(job.corpus)}" + (f" [rank {rank}]" if world > 1 else ""),
                    job.progress and rank == 0)
    t0, docs = time.perf_counter(), 0
    todo_set = set(todo)
    with open(job.corpus, encoding="utf-8-sig", errors="replace") as f:
        shard, ids, texts, counts = -1, [], [], Counter()
        for line_no, line in enumerate(f):
            s = line_no // job.shard_size
            if s != shard:
                if shard in todo_set:
                    docs += _encode_shard(enc, store, shard, (ids, texts, counts), bar)
                    bar.update(job.shard_size - len(ids))  # the shard's lines that held no passage
                shard, ids, texts, counts = s, [], [], Counter()
            if s not in todo_set:
                continue
            doc = corpus_doc(line, counts)
            if doc is not None:
                ids.append(doc[0])
                texts.append(doc[1])
        if shard in todo_set:
            docs += _encode_shard(enc, store, shard, (ids, texts, counts), bar)
            bar.update(ident["lines"] - shard * job.shard_size - len(ids))
    bar.close()
    for i in todo:  # shards past the last line (a file that grew shorter is refused by the manifest)
        if not store.done(i):
            raise UserError(f"{job.corpus}: shard {i} was not reached; the file changed while it was read")
    secs = time.perf_counter() - t0
    _barrier(world)
    totals = store.finish(n_shards) if rank == 0 else None
    return {"rank": rank, "shards": len(mine), "encoded_shards": len(todo), "skipped_shards": len(mine) - len(todo),
            "documents": docs, "seconds": round(secs, 2), "passages_per_s": round(docs / secs, 2) if docs else 0.0,
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "totals": totals}


def _encode_shard(enc: Encoder, store: EmbeddingShards, i: int, shard: tuple, bar) -> int:
    ids, texts, counts = shard
    emb = enc.encode_ids(enc.tokenize(texts), "passage", bar=bar) if texts else torch.zeros(0, enc.model.args.dim)
    store.write(i, ids, emb.numpy().astype(DTYPES[store.manifest()["dtype"]]), counts)  # (n, d)
    return len(ids)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="text", disable=not enabled, file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="preset, HF directory, .gguf file, training checkpoint "
                    "or Hub model id ORG/NAME (HF cache; downloaded unless HF_HUB_OFFLINE is set)")
    ap.add_argument("--revision", default="main", help="branch, tag or commit of a Hub model id (default main)")
    ap.add_argument("--wiki-sample", type=int, default=6, help="encode the first N Wikipedia lead paragraphs")
    ap.add_argument("--text", action="append", default=[], help="a passage to encode (repeatable)")
    ap.add_argument("--attn", default="auto")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--token-budget", type=int, default=None,
                    help=f"tokens per packed micro-batch (default: {DEFAULT_TOKEN_BUDGET['cpu']:,} on CPU, "
                         f"{DEFAULT_TOKEN_BUDGET['cuda']:,} on GPU)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    ap.add_argument("--corpus", help="a BEIR corpus.jsonl to encode in shards into --out (under torchrun: "
                    "each rank its share)")
    ap.add_argument("--out", help="directory of the embedding shards (with --corpus)")
    ap.add_argument("--shard-size", type=int, default=CorpusJob.shard_size,
                    help="corpus lines per shard (0: about 4 shards per rank, at most 10,000 lines; a rerun "
                         "resumes with the same number of ranks or the same --shard-size)")
    ap.add_argument("--dtype", default="float32", type=dtype_arg(tuple(DTYPES)),
                    help="of the stored vectors: float32 (fp32, default) or float16 (fp16)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it holds another run's shards")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.corpus or args.out:
        if not (args.corpus and args.out):
            ap.error("--corpus and --out go together")
        try:
            return corpus_main(args)
        except UserError as e:
            print(f"encode: error: {e}", file=sys.stderr)
            return 2
    texts, titles = list(args.text), [f"text{i}" for i in range(len(args.text))]
    if not texts:
        for title, text in islice(iter_wiki_sample(), args.wiki_sample):
            titles.append(title)
            texts.append(text)
    t0 = time.perf_counter()
    try:
        enc = Encoder.from_pretrained(args.model, attn_backend=args.attn, revision=args.revision, max_len=args.max_len,
                                      device=args.device, token_budget=args.token_budget)
        t1 = time.perf_counter()
        emb = enc.encode_passages(texts, progress=True)
        t2 = time.perf_counter()
    except UserError as e:
        print(f"encode: error: {e}", file=sys.stderr)
        return 2
    sim = emb @ emb.t()  # (n, n) cosine similarities
    w = min(max(len(t) for t in titles), 28)
    print(f"cosine similarity of {len(texts)} passage embeddings ({args.model}, mean of <s1>..<s8>):")
    print(" " * (w + 3) + " ".join(f"{i:>6d}" for i in range(len(texts))))
    for i, t in enumerate(titles):
        print(f"{i:>2d} {t[:w]:<{w}} " + " ".join(f"{v:6.3f}" for v in sim[i].tolist()))
    print(f"load {t1 - t0:.1f}s, encode {t2 - t1:.2f}s ({len(texts) / (t2 - t1):.1f} passages/s, "
          f"{enc.stats['tokens'] / (t2 - t1):.0f} tokens/s) on {enc.device}")


def corpus_main(args) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = args.device
    if world > 1:
        dist.init_process_group("gloo")  # barriers only: each rank encodes on its own
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        enc = Encoder.from_pretrained(args.model, attn_backend=args.attn, revision=args.revision, max_len=args.max_len,
                                      device=device, token_budget=args.token_budget)
        job = CorpusJob(args.corpus, args.out, args.shard_size, args.dtype, args.overwrite, not args.quiet)
        r = encode_corpus(enc, job, rank, world)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    print(f"rank {r['rank']}: {r['encoded_shards']} of {r['shards']} shards encoded ({r['skipped_shards']} were "
          f"done), {r['documents']} passages in {r['seconds']:.1f}s, {r['passages_per_s']:.2f} passages/s, "
          f"max RSS {r['max_rss_mib']:.0f} MiB, on {enc.device}", file=sys.stderr)
    if r["totals"] is not None:
        t = r["totals"]
        notes = "; ".join(f"{REASONS.get(k, k)}: {v}" for k, v in t["counts"].items())
        print(f"{args.out}: complete, {t['documents']} passages in {t['shards']} shards" + (f" ({notes})" if notes
                                                                                            else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
