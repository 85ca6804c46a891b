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
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from itertools import islice
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llara_fast.data.packing import greedy_groups, pack_encode_reference
from llara_fast.data.sources import iter_wiki_sample
from llara_fast.errors import UserError
from llara_fast.io.load import load
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
    def from_pretrained(cls, spec: str, attn_backend: str = "auto", **kw) -> "Encoder":
        """spec: preset, HF directory, .gguf file or training checkpoint. An HF directory written
        by llara_fast.export brings its prompts (unless ``prompts=`` is given)."""
        model, tok, prompts = load(spec, attn_backend=attn_backend)
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
                   desc: str | None = None) -> torch.Tensor:
        """(len(ids), d) fp32 unit vectors for pre-tokenised texts, in input order."""
        if kind not in ("passage", "query"):
            raise UserError(f"kind must be 'passage' or 'query', got {kind!r}")
        out = torch.empty(len(ids), self.model.args.dim, dtype=torch.float32)
        lengths = [self.suffix_len(kind) + min(len(t), self.max_len) for t in ids]
        # Sorted by length: similar lengths share a micro-batch (steadier batch cost on GPU).
        order = sorted(range(len(ids)), key=lambda i: lengths[i])
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
        bar.close()
        self.stats = {"texts": len(ids), "tokens": sum(lengths), "seconds": time.perf_counter() - t0}
        return out

    def encode(self, texts: Sequence[str], kind: str = "passage", progress: bool = False) -> torch.Tensor:
        """(len(texts), d) fp32 unit vectors, in input order."""
        return self.encode_ids(self.tokenize(texts), kind, progress)

    def encode_passages(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        return self.encode(texts, "passage", progress)

    def encode_queries(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        return self.encode(texts, "query", progress)


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="text", disable=not enabled, file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="preset, HF directory or .gguf file")
    ap.add_argument("--wiki-sample", type=int, default=6, help="encode the first N Wikipedia lead paragraphs")
    ap.add_argument("--text", action="append", default=[], help="a passage to encode (repeatable)")
    ap.add_argument("--attn", default="auto")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts, titles = list(args.text), [f"text{i}" for i in range(len(args.text))]
    if not texts:
        for title, text in islice(iter_wiki_sample(), args.wiki_sample):
            titles.append(title)
            texts.append(text)
    t0 = time.perf_counter()
    enc = Encoder.from_pretrained(args.model, attn_backend=args.attn, max_len=args.max_len, device=args.device)
    t1 = time.perf_counter()
    emb = enc.encode_passages(texts, progress=True)
    t2 = time.perf_counter()
    sim = emb @ emb.t()  # (n, n) cosine similarities
    w = min(max(len(t) for t in titles), 28)
    print(f"cosine similarity of {len(texts)} passage embeddings ({args.model}, mean of <s1>..<s8>):")
    print(" " * (w + 3) + " ".join(f"{i:>6d}" for i in range(len(texts))))
    for i, t in enumerate(titles):
        print(f"{i:>2d} {t[:w]:<{w}} " + " ".join(f"{v:6.3f}" for v in sim[i].tolist()))
    print(f"load {t1 - t0:.1f}s, encode {t2 - t1:.2f}s ({len(texts) / (t2 - t1):.1f} passages/s, "
          f"{enc.stats['tokens'] / (t2 - t1):.0f} tokens/s) on {enc.device}")


if __name__ == "__main__":
    main()
