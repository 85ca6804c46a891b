"""Packer throughput: the C++ packer vs the Python reference packer on the same examples,
and what one H100 step would consume.

    python benchmarks/bench_packer.py [--examples 4096] [--token-budget 16384] [--threads 0]

Data: passages of ~500 tokens (normal, sd 40, cut at max_len 512) over a LLaMA-2-sized
vocabulary, EBAE targets = the unique ids of the passage, EBAR targets = the unique ids of
another passage, the LLaMA-2 prompt piece lengths of DESIGN §1 (prefix 2, SUM 19, PRED 18).
Token values do not matter to a packer; lengths and set sizes do. The examples are written
as a prepared shard directory (uint16), and both packers pack the same shuffled order into
the same greedy groups:
- ``cpp``: NativePacker reading the memory-mapped shards in place, groups_per_call groups a call;
- ``cpp_loader``: the PackedLoader end to end (background thread, queue) drained as fast as possible;
- ``python``: pack_reference over Example objects (a prefix of the groups, it is slow).
Outputs are checked equal on the groups both packed. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import fields

import numpy as np
import torch

from llara_fast.config import PEAK_BF16_TFLOPS, ModelArgs
from llara_fast.data.loader import LoaderOptions, PackedLoader
from llara_fast.data.native import NativePacker, greedy_offsets, native_packer_available
from llara_fast.data.packing import pack_reference
from llara_fast.data.shards import ShardedDataset, ShardWriter, epoch_order, token_dtype_for, write_manifest
from llara_fast.templates import Template

VOCAB = 32000 + 16


def llama2_like_template(n_special: int = 8) -> Template:
    new = list(range(32000, 32016))
    sum_ids = tuple(range(100, 111)) + tuple(new[:8])    # 19 tokens, <s1>..<s8> last
    pred_ids = tuple(range(200, 210)) + tuple(new[8:])   # 18 tokens, <s9>..<s16> last
    return Template((1, 376), sum_ids, pred_ids, tuple(range(11, 11 + n_special)), tuple(range(10, 10 + n_special)),
                    frozenset([0, 1, 2] + new), n_special)


def make_data(path: str, n: int, max_len: int, seed: int = 0) -> ShardedDataset:
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.normal(500, 40, size=n).astype(np.int64), 1, None)
    w = ShardWriter(path, token_dtype_for(VOCAB), shard_examples=n)
    text = [rng.integers(3, 32000, size=int(t)) for t in lens]
    sums = [np.unique(t[:max_len]) for t in text]
    preds = [sums[(i + 1) % n] for i in range(n)]
    for i in range(0, n, 1024):
        flat = lambda xs: (np.concatenate(xs), np.array([len(x) for x in xs]))  # noqa: E731
        w.add(*flat(text[i:i + 1024]), *flat(sums[i:i + 1024]), *flat(preds[i:i + 1024]))
    write_manifest(path, {"format_version": 1, "tokenizer": {"spec": "synthetic", "fingerprint": "0" * 64},
                          "max_len": max_len, "token_dtype": token_dtype_for(VOCAB).name, "shards": w.close()})
    return ShardedDataset(path)


def same(a, b) -> bool:
    return all(torch.equal(getattr(a, f.name), getattr(b, f.name)) if isinstance(getattr(a, f.name), torch.Tensor)
               else getattr(a, f.name) == getattr(b, f.name) for f in fields(a))


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def h100_passages_per_s(batches, mfu: float = 0.5) -> dict:
    """Passages/s one H100 could train llama2-7b at ``mfu`` on these batches (DESIGN §6 FLOPs)."""
    args = ModelArgs.from_preset("llama2-7b", vocab_size=VOCAB)
    flops = examples = 0
    for b in batches:
        heads = len(b.lm_positions) + b.sum_positions.numel() + b.pred_positions.numel()
        flops += args.step_flops(b.num_tokens, b.attn_pairs(), heads)
        examples += b.num_examples
    per_passage = flops / examples
    return {"model": "llama2-7b", "mfu": mfu, "peak_tflops": PEAK_BF16_TFLOPS["h100"],
            "flops_per_passage": per_passage,
            "passages_per_s": mfu * PEAK_BF16_TFLOPS["h100"] * 1e12 / per_passage}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=4096)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--token-budget", type=int, default=16384)
    p.add_argument("--threads", type=int, default=0, help="C++ packer threads (0: all cores)")
    p.add_argument("--groups-per-call", type=int, default=8)
    p.add_argument("--python-groups", type=int, default=12, help="groups packed by the Python reference")
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    if not native_packer_available():
        sys.exit("llara_fast._C is not built: pip install -e .")
    tpl = llama2_like_template()
    with tempfile.TemporaryDirectory() as tmp:
        ds = make_data(tmp, a.examples, a.max_len)
        order = epoch_order(len(ds), seed=0, epoch=0)
        packer = NativePacker(tpl, a.max_len, a.threads)
        offs = greedy_offsets(packer.token_counts(ds.text_lengths[order]), a.token_budget)
        G = len(offs) - 1
        shard, local = ds.locate(order)

        def run_cpp():
            out = []
            for g in range(0, G, a.groups_per_call):
                sub = offs[g:g + a.groups_per_call + 1]
                out += packer.pack(ds.sources, shard[sub[0]:sub[-1]], local[sub[0]:sub[-1]], sub - sub[0])
            return out

        cpp_batches = run_cpp()
        t_cpp = best_of(run_cpp, a.repeats)

        def run_loader():
            with PackedLoader(ds, tpl, a.max_len, a.token_budget, LoaderOptions(seed=0, epochs=1, prefetch=8,
                              groups_per_call=a.groups_per_call, n_threads=a.threads, pin_memory=False)) as ld:
                return sum(b.num_examples for b in ld)

        assert run_loader() == len(order)
        t_loader = best_of(run_loader, a.repeats)

        gp = min(a.python_groups, G)
        exs = [ds.example(int(i)) for i in order[:offs[gp]]]  # built outside the timing (Example objects)

        def run_py():
            return [pack_reference(exs[offs[g]:offs[g + 1]], tpl, a.max_len) for g in range(gp)]

        py_batches = run_py()
        t_py = best_of(run_py, max(1, a.repeats - 1))
        assert all(same(x, y) for x, y in zip(py_batches, cpp_batches[:gp])), "C++ and Python packers differ"

    n_cpp = len(order)
    tokens = sum(b.num_tokens for b in cpp_batches)
    res = {
        "bench": "packer", "device": f"CPU, {os.cpu_count()} cores", "platform": platform.processor() or platform.machine(),
        "examples": n_cpp, "mean_text_tokens": float(np.minimum(ds.text_lengths, a.max_len).mean()),
        "token_budget": a.token_budget, "batches": G, "threads": a.threads or os.cpu_count(),
        "cpp_passages_per_s": n_cpp / t_cpp, "cpp_tokens_per_s": tokens / t_cpp,
        "cpp_loader_passages_per_s": n_cpp / t_loader,
        "python_passages_per_s": int(offs[gp]) / t_py, "python_examples": int(offs[gp]),
        "speedup": (n_cpp / t_cpp) / (int(offs[gp]) / t_py),
        "h100_llama2_7b": h100_passages_per_s(cpp_batches),
    }
    print(f"{'packer':<12} {'passages/s':>12}  notes")
    print(f"{'cpp':<12} {res['cpp_passages_per_s']:>12,.0f}  {res['threads']} threads, {tokens / t_cpp / 1e6:.1f} M tokens/s")
    print(f"{'cpp_loader':<12} {res['cpp_loader_passages_per_s']:>12,.0f}  PackedLoader end to end")
    print(f"{'python':<12} {res['python_passages_per_s']:>12,.0f}  pack_reference on {res['python_examples']} examples")
    h = res["h100_llama2_7b"]
    print(f"H100 llama2-7b at {h['mfu']:.0%} MFU: {h['flops_per_passage'] / 1e12:.2f} TFLOP/passage -> "
          f"{h['passages_per_s']:.1f} passages/s")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
