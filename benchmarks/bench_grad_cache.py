"""GradCache's memory and time: one contrastive step of B queries (group 1 + 3 negatives) in
one piece vs GradCache in chunks of a fixed size, each configuration in a fresh process, on
real SmolLM2-135M weights cut to --layers blocks and Wikipedia text.

    python benchmarks/bench_grad_cache.py [--batches 4,8,16] [--chunk 4] [--layers 2] [--passage-len 128]

Prints peak memory during the steps (CPU: the process's RSS high-water mark, reset after loading;
GPU: torch.cuda.max_memory_allocated) and the
median step time of --steps steps after one warm-up; GradCache's peak should stay flat as B
grows with a fixed chunk, the one-piece step's grows with B.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import torch

from llara_fast.data.loader import ContrastiveBatch
from llara_fast.data.packing import pack_encode_reference
from llara_fast.data.sources import iter_wiki_sample
from llara_fast.io.load import load
from llara_fast.objectives.contrastive import ContrastiveConfig, ContrastiveModule, ContrastiveObjective
from llara_fast.templates import Template
from llara_fast.train.step import build_optimizer, optimizer_step

GROUP = 4


def worker(a) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model0, tok, _ = load("smollm2-135m", attn_backend="auto")
    model = model0
    if a.layers:
        del model.layers[a.layers:]
        model.args.n_layers = a.layers
    model.to(device).train()
    tpl = Template.from_tokenizer(tok)
    items = list(islice(iter_wiki_sample(), a.batch * (1 + GROUP)))
    qs = [tok(t, add_special_tokens=False)["input_ids"][:32] for t, _ in items[:a.batch]]
    ps = [tok(x, add_special_tokens=False)["input_ids"][:a.passage_len] for _, x in items[:a.batch * GROUP]]
    per_mb = a.chunk if a.grad_cache else a.batch
    mbs = []
    for i in range(0, a.batch, per_mb):
        q, p = qs[i:i + per_mb], ps[i * GROUP:(i + per_mb) * GROUP]
        batch, special = pack_encode_reference(q + p, tpl, ["query"] * len(q) + ["passage"] * len(p), 1 << 30)
        mbs.append(ContrastiveBatch(batch, special, len(q), GROUP))
    cfg = ContrastiveConfig(temperature=0.01, grad_cache=a.grad_cache)
    module, objective = ContrastiveModule(model, cfg), ContrastiveObjective(model.args.vocab_size, cfg)
    opt = build_optimizer(module, lr=1e-5, weight_decay=0.0)
    times = []
    base = _reset_peak(device)  # the peak of the steps, not of loading the model
    for _ in range(1 + a.steps):
        t0 = time.perf_counter()
        stats = optimizer_step(module, mbs, opt, None, objective, device=device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_rss_mib()
    return {"batch": a.batch, "grad_cache": a.grad_cache, "chunk": per_mb, "micro_batches": len(mbs),
            "tokens": sum(mb.batch.num_tokens for mb in mbs), "peak_mib": round(peak, 1), "base_mib": round(base, 1),
            "step_peak_mib": round(peak - base, 1),
            "step_s": round(statistics.median(times[1:]), 3), "loss": stats.parts[0], "device": str(device)}


def _reset_peak(device: torch.device) -> float:
    """Reset the peak counter; returns the memory in use now (MiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the VmHWM high-water mark to VmRSS
    return _status_mib("VmRSS")


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mib() -> float:
    return _status_mib("VmHWM")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="4,8,16", help="queries per step")
    ap.add_argument("--chunk", type=int, default=4, help="GradCache queries per chunk")
    ap.add_argument("--layers", type=int, default=2, help="SmolLM2 blocks kept (0: all 30)")
    ap.add_argument("--passage-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--grad-cache", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    rows = []
    for b in (int(x) for x in a.batches.split(",")):
        for gc in (False, True):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--batch", str(b), "--chunk",
                   str(a.chunk), "--layers", str(a.layers), "--passage-len", str(a.passage_len), "--steps",
                   str(a.steps), *(["--grad-cache"] if gc else [])]
            p = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if p.returncode != 0:
                print(p.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"B={r['batch']:>3} {'gradcache chunk ' + str(r['chunk']) if gc else 'one piece':<18} "
                  f"{r['micro_batches']:>2} micro-batches {r['tokens']:>6} tokens  peak {r['peak_mib']:>8.1f} MiB "
                  f"(+{r['step_peak_mib']:.1f} over the model)  "
                  f"step {r['step_s']:.2f}s  loss {r['loss']:.4f}", flush=True)
    for b in sorted({r["batch"] for r in rows}):
        one, gc = (next(r for r in rows if r["batch"] == b and r["grad_cache"] == g) for g in (False, True))
        print(f"B={b}: GradCache / one piece: peak {gc['peak_mib'] / one['peak_mib']:.2f}x (step part "
              f"{gc['step_peak_mib']:.0f} vs {one['step_peak_mib']:.0f} MiB), "
              f"step time {gc['step_s'] / one['step_s']:.2f}x, loss equal to {abs(gc['loss'] - one['loss']):.1e}")
    print(json.dumps({"bench": "grad_cache", "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
