"""Throughput and memory of `python -m llara_fast.data.prepare` against worker count and corpus
size, and the time to prepare English Wikipedia projected from the measured rates.

    python benchmarks/bench_prepare.py [--sizes 100,200] [--workers 1,2] [--repeats 2] [--out FILE.json]
    python benchmarks/bench_prepare.py --quick     # a smoke run: 3 and 6 MB corpora, once each

Corpora (``--format text`` JSONL, what a Wikipedia dump becomes): "articles" of
``--article-paras`` (6) consecutive Wikipedia lead paragraphs of the ovos sample joined by blank
lines (~620 SmolLM2 tokens each, English Wikipedia's mean being ~4 B tokens / 6.5 M articles),
cycling through the 10,033 paragraphs until the file holds SIZE MB; built once under
``--assets`` (.bench_assets/) and reused. prepare runs with ``--max-len 128`` (128-token chunks).

Each run is a fresh process (``--_run``: prepare's CLI, then its resource usage as JSON), run
interleaved: for each repeat, for each size, for each worker count (sizes after the first run
once unless ``--repeat-all``). Per run:
- tokens/s, examples/s: passage tokens and examples written over prepare's own ``seconds``
  (tokenizer load, pool start and manifest included; interpreter start not) — ``wall_s`` is the
  whole process;
- driver CPU s: ``getrusage(RUSAGE_SELF)`` of the prepare process from after its imports to the
  end of prepare (all its threads; the pool's result threads included; ``startup_cpu_s`` is the
  interpreter start and the imports before it), workers CPU s: ``getrusage(RUSAGE_CHILDREN)`` (the pool's processes,
  reaped before it returns). With ``--workers 1`` everything runs in the driver;
- peak memory of the process tree: the driver and its descendants polled every 0.1 s from /proc;
  ``peak_pss_mib`` is the peak of the sum of their PSS (proportional set size: a page shared by
  the forked workers counts once in total), ``peak_rss_sum_mib`` the peak of the sum of their RSS
  (shared pages counted in every process), ``max_rss_mib`` the largest single process's peak RSS
  (ru_maxrss of the driver and of its reaped children).
Reference: the bare tokenizer (the fast tokenizer's ``encode_batch``, no special tokens, batches
of 256 articles, one thread, in its own process) on the first articles of the smallest corpus.

Derived: the speedup of each worker count over one worker (median tokens/s, per size); the
growth of peak memory from the smallest to the largest size (per worker count); the driver's CPU
per example and per token, measured alone (``driver_replay``: the smallest corpus's block
results, pickled as the workers send them, fed to prepare's ``Sink``, best of 3) and as the
slope of the driver's CPU between the two largest sizes in the runs with the most workers (its
fixed costs drop out; noisy unless the sizes differ by many tokens); the workers' CPU per token
against the bare tokenizer's; and the projection for English Wikipedia (``--project-articles``
6.5 M, ``--project-tokens`` 4 B, ``--project-cores`` 32): hours = tokens / (cores x the per-core
rate), the per-core rate being the passage tokens per worker-CPU second of the runs with the
most workers, at least tokens x the driver's CPU per token (driver_replay), plus the driver's
fixed cost. Assumes the node's cores run as fast as this machine's, workers do not contend
(memory bandwidth, disk), the articles tokenise at the rate of these lead-paragraph articles,
and the driver shares a core (its share is printed).

Refuses to time on a busy machine (1-minute load average >= ``--max-load``, default 1.0) unless
``--force``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from itertools import cycle
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_FLAG = "--_run"
MiB = 2**20


# ---- corpus -------------------------------------------------------------------------------------
def build_corpus(path: Path, size_mb: float, paras_per_article: int) -> Path:
    """SIZE MB of {"id", "title", "text"} articles of consecutive lead paragraphs (built once)."""
    if path.is_file():
        return path
    from llara_fast.data.sources import iter_wiki_sample

    paras = list(iter_wiki_sample())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, target, n, i = path.with_suffix(".tmp"), int(size_mb * 1e6), 0, 0
    it = cycle(range(len(paras)))
    with open(tmp, "w") as f:
        while n < target:
            idx = [next(it) for _ in range(paras_per_article)]
            line = json.dumps({"id": f"a{i}", "title": paras[idx[0]][0],
                               "text": "\n\n".join(paras[j][1] for j in idx)}) + "\n"
            f.write(line)
            n += len(line.encode())
            i += 1
    os.replace(tmp, path)
    return path


# ---- one prepare run (in its own process) -----------------------------------------------------------
def run_prepare_here(argv: list[str]) -> int:
    """prepare's CLI in this process, then its resource usage on stderr as one JSON line (the
    driver's CPU counted from after the imports)."""
    from llara_fast.data.prepare import main

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    rc = main(argv)
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = r0.ru_utime + r0.ru_stime
    print("RUSAGE " + json.dumps({
        "driver_cpu_s": me.ru_utime + me.ru_stime - start, "startup_cpu_s": start,
        "workers_cpu_s": kids.ru_utime + kids.ru_stime, "driver_maxrss_mib": me.ru_maxrss / 1024,
        "workers_maxrss_mib": kids.ru_maxrss / 1024}), file=sys.stderr, flush=True)
    return rc


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _mem_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in KiB; (0, 0) if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            vals = dict(line.split(":", 1) for line in f if ":" in line and not line.startswith("0"))
        return int(vals["Pss"].split()[0]), int(vals["Rss"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0, 0


def measure_run(corpus: Path, workers: int, out: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), RUN_FLAG, "--input", str(corpus), "--format", "text",
           "--tokenizer", args.tokenizer, "--max-len", str(args.max_len), "--out", str(out), "--overwrite",
           "--no-progress", "--workers", str(workers)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak_pss = peak_rss = 0
    while proc.poll() is None:
        pss, rss = map(sum, zip(*(_mem_kib(p) for p in _tree(proc.pid))))
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"prepare failed ({proc.returncode}): {stderr[-2000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    usage = json.loads(next(line for line in stderr.splitlines() if line.startswith("RUSAGE "))[7:])
    secs = summary["seconds"]
    return {"size_mb": round(corpus.stat().st_size / 1e6, 1), "workers": workers, "records": summary["records"],
            "examples": summary["examples"], "tokens": summary["text_tokens"], "prepare_s": secs,
            "wall_s": round(wall, 2), "tokens_per_s": round(summary["text_tokens"] / secs),
            "examples_per_s": round(summary["examples"] / secs), "startup_cpu_s": round(usage["startup_cpu_s"], 2),
            "driver_cpu_s": round(usage["driver_cpu_s"], 2),
            "workers_cpu_s": round(usage["workers_cpu_s"], 2), "peak_pss_mib": round(peak_pss / 1024, 1),
            "peak_rss_sum_mib": round(peak_rss / 1024, 1),
            "max_rss_mib": round(max(usage["driver_maxrss_mib"], usage["workers_maxrss_mib"]), 1)}


# ---- the bare tokenizer ---------------------------------------------------------------------------
BARE_CODE = """
import json, os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"
from llara_fast.data.prepare import _load_tokenizer, resolve_tokenizer
tok = _load_tokenizer(resolve_tokenizer(sys.argv[2])).backend_tokenizer
texts = []
with open(sys.argv[1]) as f:
    for line in f:
        texts.append(json.loads(line)["text"].strip())
        if len(texts) == int(sys.argv[3]):
            break
tok.encode_batch(texts[:64], add_special_tokens=False)
c0, t0, n = time.process_time(), time.perf_counter(), 0
for i in range(0, len(texts), 256):
    n += sum(len(e.ids) for e in tok.encode_batch(texts[i:i + 256], add_special_tokens=False))
print(json.dumps({"articles": len(texts), "tokens": n, "cpu_s": time.process_time() - c0,
                  "wall_s": time.perf_counter() - t0}))
"""


def bare_tokenizer(corpus: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", BARE_CODE, str(corpus), args.tokenizer, str(args.bare_articles)],
                       capture_output=True, text=True, env=env, check=False)
    if p.returncode != 0:
        sys.exit(f"bare tokenizer run failed: {p.stderr[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["tokens_per_s"] = round(r["tokens"] / r["wall_s"])
    r["cpu_us_per_token"] = round(r["cpu_s"] / r["tokens"] * 1e6, 3)
    r["tokens_per_article"] = round(r["tokens"] / r["articles"], 1)
    return r


DRIVER_CODE = """
import json, pickle, sys, tempfile, time
from collections import Counter
from pathlib import Path
import numpy as np
from llara_fast.data import prepare as P
from llara_fast.data.records import plan_blocks
from llara_fast.data.shards import ShardWriter
inp, opts = Path(sys.argv[1]), P.PrepareOptions(workers=1, progress=False)
job, _ = P._resolve_job(inp, "text", sys.argv[2], int(sys.argv[3]), Path(tempfile.mkdtemp()) / "o", opts)
worker = P.BatchWorker(job)
blocks = list(plan_blocks(inp, "text", opts.block_bytes, opts.batch_records, None))
blobs = [pickle.dumps(worker.run(b)) for b in blocks]  # what the workers send
best = None
for _ in range(3):
    with tempfile.TemporaryDirectory() as out:
        sink = P.Sink(ShardWriter(out, np.dtype(job.token_dtype)), opts, Counter())
        c0 = time.process_time()
        for blob, b in zip(blobs, blocks):
            sink.add(b, pickle.loads(blob))
        sink.writer.close()
        cpu = time.process_time() - c0
    best = cpu if best is None else min(best, cpu)
tokens = int(sum(s["text_tokens"] for s in sink.writer.shards))
print(json.dumps({"blocks": len(blocks), "tokens": tokens, "examples": sink.examples, "cpu_s": best,
                  "ns_per_token": best / tokens * 1e9, "us_per_example": best / sink.examples * 1e6,
                  "bytes_sent_per_token": sum(map(len, blobs)) / tokens}))
"""


def driver_replay(corpus: Path, args) -> dict:
    """The driver's CPU per block result, measured alone: the smallest corpus's blocks tokenised
    first, then their pickled results unpickled and fed to prepare's Sink (what the driver does
    per block: the pool's unpickling, appending, hashing, writing, counting), best of 3."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-c", DRIVER_CODE, str(corpus), args.tokenizer, str(args.max_len)],
                       capture_output=True, text=True, env=env, check=False)
    if p.returncode != 0:
        sys.exit(f"driver replay failed: {p.stderr[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}


# ---- summary ----------------------------------------------------------------------------------------
def derive(rows: list[dict], bare: dict, replay: dict, args) -> dict:
    sizes = sorted({r["size_mb"] for r in rows})
    workers = sorted({r["workers"] for r in rows})
    med = {(s, w): statistics.median(r["tokens_per_s"] for r in rows if r["size_mb"] == s and r["workers"] == w)
           for s in sizes for w in workers if any(r["size_mb"] == s and r["workers"] == w for r in rows)}
    speedup = {f"{s}MB": {f"w{w}/w{workers[0]}": round(med[s, w] / med[s, workers[0]], 3) for w in workers
                          if (s, w) in med and (s, workers[0]) in med} for s in sizes}
    peak = {w: {s: max(r["peak_pss_mib"] for r in rows if r["size_mb"] == s and r["workers"] == w)
                for s in sizes if (s, w) in med} for w in workers}
    memory = {f"w{w}": {"peak_pss_mib": {f"{s}MB": v for s, v in p.items()},
                        "largest_over_smallest": round(p[max(p)] / p[min(p)], 3) if len(p) > 1 else None}
              for w, p in peak.items()}
    # the driver's cost per example: the slope of its CPU between the two largest sizes, runs with >1 worker
    multi = [r for r in rows if r["workers"] == workers[-1]]
    driver = None
    if workers[-1] > 1 and len(sizes) > 1:
        a = [r for r in multi if r["size_mb"] == sizes[-2]]
        b = [r for r in multi if r["size_mb"] == sizes[-1]]
        d_cpu = statistics.median(r["driver_cpu_s"] for r in b) - statistics.median(r["driver_cpu_s"] for r in a)
        d_ex, d_tok = b[0]["examples"] - a[0]["examples"], b[0]["tokens"] - a[0]["tokens"]
        driver = {"us_per_example": round(d_cpu / d_ex * 1e6, 3), "ns_per_token": round(d_cpu / d_tok * 1e9, 2),
                  "fixed_s": round(statistics.median(r["driver_cpu_s"] for r in a) - d_cpu / d_tok * a[0]["tokens"], 2)}
    worker_us_tok = None
    if workers[-1] > 1:
        worker_us_tok = statistics.median(r["workers_cpu_s"] / r["tokens"] * 1e6 for r in multi)
    out = {"speedup": speedup, "memory": memory, "driver": driver,
           "workers_cpu_us_per_token": round(worker_us_tok, 3) if worker_us_tok else None,
           "workers_cpu_over_bare_tokenizer": round(worker_us_tok / bare["cpu_us_per_token"], 2)
           if worker_us_tok else None}
    out["driver_replay"] = replay
    out["projection"] = project(rows, replay, driver, worker_us_tok, args)
    out["acceptance"] = {  # issue 29 point 4: --workers 2 >= 1.7x --workers 1; peak memory flat across sizes
        "speedup_ge_1.7": {k: v.get("w2/w1", 0) >= 1.7 for k, v in speedup.items() if "w2/w1" in v},
        "peak_pss_flat_within_10pct": {k: v["largest_over_smallest"] <= 1.1 for k, v in memory.items()
                                       if v["largest_over_smallest"] is not None}}
    return out


def project(rows, replay, driver, worker_us_tok, args) -> dict | None:
    if not worker_us_tok:
        return None
    tok_per_ex = statistics.median(r["tokens"] / r["examples"] for r in rows)
    per_core = 1e6 / worker_us_tok                                 # passage tokens per worker-CPU second
    work_s = args.project_tokens / (args.project_cores * per_core)
    driver_s = replay["ns_per_token"] * 1e-9 * args.project_tokens
    fixed_s = driver["fixed_s"] if driver else 0.0
    return {"articles": args.project_articles, "tokens": args.project_tokens, "cores": args.project_cores,
            "examples": round(args.project_tokens / tok_per_ex), "per_core_tokens_per_s": round(per_core),
            "node_tokens_per_s": round(args.project_cores * per_core),
            "hours": round((max(work_s, driver_s) + max(fixed_s, 0)) / 3600, 2),
            "driver_share_of_one_core": round(driver_s / work_s, 3),
            "driver_ceiling_tokens_per_s": round(1e9 / replay["ns_per_token"]),
            "driver_ceiling_cores": round(1e9 / replay["ns_per_token"] / per_core),
            "assumes": f"{args.project_cores} workers at this machine's per-core rate (passage tokens per worker-CPU "
                       "second), no contention between them (memory bandwidth, disk), Wikipedia articles tokenising "
                       "at the rate of these lead-paragraph articles, the driver sharing a core (its share printed, "
                       "from driver_replay); hours = tokens / (cores x per-core rate), at least tokens x the "
                       "driver's CPU per token, plus the driver's fixed cost"}


def table(rows: list[dict]) -> str:
    cols = ["size_mb", "workers", "tokens_per_s", "examples_per_s", "prepare_s", "wall_s", "startup_cpu_s",
            "driver_cpu_s", "workers_cpu_s", "peak_pss_mib", "peak_rss_sum_mib", "max_rss_mib"]
    w = [max(len(c), 8) for c in cols]
    lines = [" ".join(f"{c:>{n}}" for c, n in zip(cols, w))]
    lines += [" ".join(f"{r[c]:>{n}}" for c, n in zip(cols, w)) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [RUN_FLAG]:
        return run_prepare_here(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,200", help="corpus sizes in MB (default 100,200)")
    ap.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per worker count on the first size (default 2)")
    ap.add_argument("--repeat-all", action="store_true", help="repeat on every size, not only the first")
    ap.add_argument("--quick", action="store_true", help="smoke run: sizes 3,6 MB, one run each")
    ap.add_argument("--tokenizer", default="smollm2-135m")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--article-paras", type=int, default=6)
    ap.add_argument("--bare-articles", type=int, default=2000)
    ap.add_argument("--assets", default=str(ROOT / ".bench_assets"))
    ap.add_argument("--project-articles", type=float, default=6.5e6)
    ap.add_argument("--project-tokens", type=float, default=4e9)
    ap.add_argument("--project-cores", type=int, default=32)
    ap.add_argument("--max-load", type=float, default=1.0, help="refuse when the 1-minute load average is above this")
    ap.add_argument("--force", action="store_true", help="time even on a busy machine")
    ap.add_argument("--out", help="write the rows and the derived figures here (JSON)")
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.repeats = "3,6", 1
    load = os.getloadavg()[0]
    if load >= a.max_load and not a.force:
        sys.exit(f"load average {load:.2f} >= {a.max_load}: timings would measure the other load; run on an idle "
                 "machine (or pass --force for a smoke run)")
    sizes = [float(s) for s in a.sizes.split(",")]
    worker_counts = [int(w) for w in a.workers.split(",")]
    corpora = {s: build_corpus(Path(a.assets) / f"prepare-wiki-{s:g}mb-a{a.article_paras}.jsonl", s, a.article_paras)
               for s in sizes}
    bare = bare_tokenizer(corpora[sizes[0]], a)
    replay = driver_replay(corpora[sizes[0]], a)
    print(f"driver alone: {replay['ns_per_token']} ns CPU/token, {replay['us_per_example']} us/example", flush=True)
    print(f"bare tokenizer: {bare['tokens_per_s']:,} tokens/s on one core ({bare['cpu_us_per_token']} us CPU/token, "
          f"{bare['tokens_per_article']} tokens/article)", flush=True)
    rows = []
    out_dir = Path(a.assets) / "prepare-bench-out"
    for rep in range(a.repeats):
        for i, s in enumerate(sizes):
            if rep and i and not a.repeat_all:
                continue
            for w in worker_counts:
                rows.append(measure_run(corpora[s], w, out_dir, a))
                r = rows[-1]
                print(f"{r['size_mb']} MB, {w} workers: {r['tokens_per_s']:,} tokens/s, {r['examples_per_s']:,} "
                      f"examples/s, {r['prepare_s']} s, peak PSS {r['peak_pss_mib']} MiB", flush=True)
    derived = derive(rows, bare, replay, a)
    print(table(rows))
    print(json.dumps(derived, indent=1))
    result = {"bench": "prepare", "machine": {"cpus": os.cpu_count(), "usable": len(os.sched_getaffinity(0)),
                                              "processor": platform.processor() or platform.machine(),
                                              "load_at_start": round(load, 2)},
              "options": {k: v for k, v in vars(a).items() if k not in ("out",)}, "bare_tokenizer": bare,
              "rows": rows, **derived}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
