"""Encoding speed on one model, three ways, side by side (issue 29):

- ``ours``: llara_fast.encode.Encoder (packed, unpadded micro-batches) on the export;
- ``st``:   sentence-transformers loading that same export
            (``SentenceTransformer(DIR, trust_remote_code=True).encode_document(texts, batch_size=B)``);
- ``hf``:   plain transformers with left padding, the released LLaRA encode recipe
            (llara_fast.evaluate.hf_padded_encode, batches in corpus order).

Same texts (the first --n documents of a BEIR corpus, title + text, cut at --max-len text
tokens), same threads, same dtype (fp32), each method timed from texts to unit vectors
(tokenisation included). Rounds are interleaved (ours, st, hf, then rotated) so a machine
that slows down for a while slows every method; the median round is reported. GFLOP/s counts
the model's work on real tokens (2 x non-embedding parameters per token plus causal
attention), set beside the machine's fp32 GEMM rate measured here at the model's shapes and at
2048^3. The max embedding difference of st and hf to ours is printed (fp32: <= 1e-5 is the goal).

    python benchmarks/bench_encode.py [--n 300] [--max-len 256] [--rounds 3] [--out FILE.json]

The export is built once under .bench_assets/ (python -m llara_fast.export --checkpoint MODEL).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _bench_util import versions  # noqa: E402

from llara_fast.data.beir import load_beir  # noqa: E402
from llara_fast.encode import Encoder  # noqa: E402
from llara_fast.evaluate import hf_padded_encode  # noqa: E402

DEFAULT_BEIR = ROOT.parent / "shared" / "data" / "beir" / "scifact"


def build_export(model: str, out: Path) -> Path:
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "llara_fast.export", "--checkpoint", model, "--out", str(out)],
                       check=True)
    return out


def gemm_rate(shapes: list[tuple[int, int, int]], reps: int = 5) -> float:
    """Median fp32 GFLOP/s of F.linear over (m, k, n) shapes, one after another (warm)."""
    rates = []
    for m, k, n in shapes:
        x, w = torch.randn(m, k), torch.randn(n, k)
        F.linear(x, w)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            F.linear(x, w)
            ts.append(time.perf_counter() - t0)
        rates.append(2 * m * k * n / statistics.median(ts) / 1e9)
    return statistics.median(rates)


def model_flops(args, lengths: list[int]) -> float:
    """Forward FLOPs on real tokens: 2 per weight per token (no embedding lookup, no LM head)
    plus causal attention (QK^T and PV: 2·2·H·D per visible key, i+1 keys at position i)."""
    d, hd, H, KV, f, L = args.dim, args.head_dim, args.n_heads, args.n_kv_heads, args.ffn_hidden, args.n_layers
    per_tok = L * 2 * (d * H * hd + 2 * d * KV * hd + H * hd * d + 3 * d * f)
    attn = sum(L * 4 * H * hd * n * (n + 1) / 2 for n in lengths)
    return per_tok * sum(lengths) + attn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="what to export (a preset, HF dir or .gguf)")
    ap.add_argument("--export", default=None, help="an existing export (default: built under .bench_assets/)")
    ap.add_argument("--beir", default=str(DEFAULT_BEIR))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16, help="of st and hf")
    ap.add_argument("--token-budget", type=int, default=None, help="of ours (default: the Encoder's)")
    ap.add_argument("--methods", default="ours,st,hf")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    ap.add_argument("--out", default=None, help="also write the JSON record here")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    export = Path(a.export) if a.export else build_export(a.model, ROOT / ".bench_assets" / f"{a.model}-export")

    data = load_beir(a.beir, "test")
    texts = data.doc_texts[:a.n]
    enc = Encoder.from_pretrained(str(export), max_len=a.max_len, token_budget=a.token_budget, device="cpu")
    ids = enc.tokenize(texts)
    lengths = [enc.suffix_len("passage") + len(t) for t in ids]
    flops = model_flops(enc.model.args, lengths)
    st = None
    if "st" in methods:
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(str(export), trust_remote_code=True, device="cpu")
        st.max_seq_length = a.max_len

    warm = {}  # method -> True while it warms up (on the first 8 texts)

    def some(method):
        return texts[:8] if warm.get(method) else texts

    def run_ours():
        return enc.encode(some("ours"), "passage")

    def run_st():
        return torch.as_tensor(st.encode_document(some("st"), batch_size=a.batch_size, convert_to_numpy=True))

    hf_model = {}

    def run_hf():
        if "m" not in hf_model:  # loaded once, outside the timing (hf_padded_encode takes a model)
            from transformers import AutoModel
            hf_model["m"] = AutoModel.from_pretrained(str(export), dtype=torch.float32,
                                                      attn_implementation="sdpa").eval()
        tok = enc.tokenize(some("hf"))
        return hf_padded_encode(hf_model["m"], tok, enc.template, "passage", a.batch_size)[0]

    runs = {"ours": run_ours, "st": run_st, "hf": run_hf}
    for m in methods:  # warm-up on a few texts: thread pools, oneDNN primitives, allocator, model loads
        warm[m] = True
        runs[m]()
        warm[m] = False
    gemm_model = gemm_rate([(2048, enc.model.args.dim, enc.model.args.ffn_hidden),
                            (2048, enc.model.args.ffn_hidden, enc.model.args.dim)])
    gemm_2048 = gemm_rate([(2048, 2048, 2048)], reps=3)
    secs = {m: [] for m in methods}
    cpu = {m: [] for m in methods}  # process CPU seconds: at 1 thread, a figure that a busy machine disturbs less
    embs = {}
    for r in range(a.rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for m in order:
            t0, c0 = time.perf_counter(), time.process_time()
            embs[m] = runs[m]().float()
            secs[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
            print(f"round {r + 1}: {m:<4} {secs[m][-1]:7.2f} s ({cpu[m][-1]:7.2f} CPU s)  "
                  f"{len(texts) / secs[m][-1]:6.2f} passages/s", file=sys.stderr, flush=True)

    rec = {"bench": "encode", "date": time.strftime("%Y-%m-%d"), "cpu": _cpu_name(), "cores": os.cpu_count(),
           "threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability(),
           **versions(), "export": str(export), "texts": len(texts), "max_len": a.max_len,
           "real_tokens": sum(lengths), "token_budget": enc.token_budget, "batch_size": a.batch_size,
           "gemm_gflops_model_shapes": round(gemm_model, 1), "gemm_gflops_2048": round(gemm_2048, 1),
           "model_gflop": round(flops / 1e9, 2), "methods": {}}
    print(f"{len(texts)} passages, {sum(lengths)} real tokens, max_len {a.max_len}, {torch.get_num_threads()} "
          f"threads; fp32 GEMM {gemm_model:.0f} GFLOP/s at the model's shapes, {gemm_2048:.0f} at 2048^3")
    print(f"{'method':<6} {'passages/s':>10} {'tokens/s':>9} {'GFLOP/s':>8} {'%GEMM':>6} {'vs st':>6} "
          f"{'CPU s':>7} {'max |emb - ours|':>17}")
    for m in methods:
        s = statistics.median(secs[m])
        diff = float((embs[m] - embs["ours"]).abs().max()) if "ours" in embs else None
        rec["methods"][m] = {"seconds": [round(x, 3) for x in secs[m]], "median_s": round(s, 3),
                             "cpu_seconds": [round(x, 3) for x in cpu[m]], "median_cpu_s": round(statistics.median(cpu[m]), 3),
                             "passages_per_s": round(len(texts) / s, 3), "tokens_per_s": round(sum(lengths) / s, 1),
                             "gflops": round(flops / s / 1e9, 2), "max_abs_diff_vs_ours": diff}
    for m in methods:
        r = rec["methods"][m]
        vs = (r["passages_per_s"] / rec["methods"]["st"]["passages_per_s"]) if "st" in methods else float("nan")
        r["vs_st"] = round(vs, 3)
        print(f"{m:<6} {r['passages_per_s']:>10.2f} {r['tokens_per_s']:>9.0f} {r['gflops']:>8.1f} "
              f"{100 * r['gflops'] / gemm_model:>5.0f}% {vs:>6.2f} {r['median_cpu_s']:>7.1f} "
              f"{'-' if r['max_abs_diff_vs_ours'] is None else format(r['max_abs_diff_vs_ours'], '.2e'):>17}")
    print(json.dumps(rec))
    if a.out:
        Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
