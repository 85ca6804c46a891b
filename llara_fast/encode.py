"""Packed, unpadded encoding (DESIGN §1 "Encoder use").

passage -> PREFIX text SUM, embedding = mean of the final-normed hidden states at <s1>..<sK>;
query   -> PREFIX text PRED, mean over <s9>..<s(8+K)>; both L2-normalised.

    python -m llara_fast.encode --model smollm2-135m --wiki-sample 6
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from llara_fast.data.packing import greedy_groups, pack_encode_reference
from llara_fast.data.templates import PromptConfig, Template


class Encoder:
    def __init__(self, model, tokenizer, prompts: PromptConfig = PromptConfig(), max_len: int = 512,
                 token_budget: int = 8192, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = tokenizer
        self.template = Template.from_tokenizer(tokenizer, prompts)
        self.max_len, self.token_budget = max_len, token_budget

    @classmethod
    def from_pretrained(cls, spec: str, attn_backend: str = "auto", **kw) -> "Encoder":
        from llara_fast.hf import load_model

        model, tok = load_model(spec, attn_backend=attn_backend)
        return cls(model, tok, **kw)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False, truncation=True,
                              max_length=self.max_len)["input_ids"]

    @torch.no_grad()
    def encode(self, texts: Sequence[str], kind: str = "passage", progress: bool = False) -> torch.Tensor:
        """(len(texts), d) fp32 unit vectors, in input order."""
        ids = self.tokenize(texts)
        fixed = len(self.template.prefix_ids) + len(self.template.sum_ids if kind == "passage"
                                                    else self.template.pred_ids)
        # Sort by length so micro-batches hold similar lengths; results go back in input order.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.model.args.dim, dtype=torch.float32)
        bar = _progress(len(ids), f"encode {kind}s", progress)
        groups = greedy_groups([fixed + min(len(ids[i]), self.max_len) for i in order], self.token_budget)
        for g in groups:
            sel = [order[j] for j in g]
            batch, special = pack_encode_reference([ids[i] for i in sel], self.template, kind, self.max_len)
            hidden = self.model(batch.to(self.device))  # (N, d)
            emb = hidden[special.to(self.device)].float().mean(1)  # (E, d)
            out[sel] = F.normalize(emb, dim=-1).cpu()
            bar.update(len(sel))
        bar.close()
        return out

    def encode_passages(self, texts, progress=False):
        return self.encode(texts, "passage", progress)

    def encode_queries(self, texts, progress=False):
        return self.encode(texts, "query", progress)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="text", disable=not enabled, file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="preset, HF directory or .gguf file")
    ap.add_argument("--wiki-sample", type=int, default=6, help="encode the first N Wikipedia lead paragraphs")
    ap.add_argument("--text", action="append", default=[], help="a passage to encode (repeatable)")
    ap.add_argument("--attn", default="auto")
    ap.add_argument("--max-len", type=int, default=512)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts, titles = list(args.text), [f"text{i}" for i in range(len(args.text))]
    if not texts:
        from itertools import islice

        from llara_fast.data.sources import iter_wiki_sample

        for title, text in islice(iter_wiki_sample(), args.wiki_sample):
            titles.append(title)
            texts.append(text)
    t0 = time.perf_counter()
    enc = Encoder.from_pretrained(args.model, attn_backend=args.attn, max_len=args.max_len)
    t1 = time.perf_counter()
    emb = enc.encode_passages(texts, progress=True)
    t2 = time.perf_counter()
    sim = emb @ emb.t()  # (n, n) cosine similarities
    w = max(len(t) for t in titles[:len(texts)])
    w = min(w, 28)
    print(f"cosine similarity of {len(texts)} passage embeddings ({args.model}, mean of <s1>..<s8>):")
    print(" " * (w + 2) + " ".join(f"{i:>6d}" for i in range(len(texts))))
    for i, t in enumerate(titles[:len(texts)]):
        print(f"{i:>2d} {t[:w - 1]:<{w - 1}} " + " ".join(f"{v:6.3f}" for v in sim[i].tolist()))
    print(f"load {t1 - t0:.1f}s, encode {t2 - t1:.2f}s ({len(texts) / (t2 - t1):.1f} passages/s) on {enc.device}")


if __name__ == "__main__":
    main()
