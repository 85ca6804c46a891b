"""Fault campaign: interrupt training at random points (kill -9 or SIGTERM, during steps and during
checkpoint saves), resume, and check that every resumed run equals the uninterrupted one.

    python benchmarks/fault_campaign.py --tries 30 [--steps 8] [--seed 0] [--out FILE.json]

One reference run of the debug preset (`--steps` steps, a checkpoint every 2) records its per-step
losses and the fingerprint of each step's batches (tests/hooked_run.py --hash-dir). Each try starts
the same run, waits until its first step is done, then a random time within the reference's
training phase (steps and checkpoint saves, start-up excluded), sends SIGKILL or SIGTERM (chosen
at random), then resumes with --run.resume true until the run completes (a try whose run
had already finished counts as not interrupted). A try survives when the final metrics.jsonl holds
each step once with the reference's losses (rel 1e-6) and the batches of every step re-run after
the resume have the reference's fingerprints. Prints one line per try and a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOKED = ROOT / "tests" / "hooked_run.py"


def run_args(out: Path, steps: int, data: Path) -> list[str]:
    return ["--model.name", "debug", "--data.dir", str(data), "--data.token_budget", "500", "--optim.lr", "1e-3",
            "--optim.warmup_steps", "1", "--run.steps", str(steps), "--run.ckpt_every", "2",
            "--run.out_dir", str(out)]


def start(args: list[str], hashes: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(HOOKED), "--hash-dir", str(hashes), "--", "llara_fast.pretrain", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []


def hashes(directory: Path) -> dict[int, int]:
    out: dict[int, int] = {}
    for f in directory.glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out[rec["step"]] = rec["hash"]  # one rank: the last record of a step wins
    return out


def first_step(proc: subprocess.Popen, out: Path) -> None:
    """Wait until the run has recorded its first step (or ended)."""
    while proc.poll() is None and not metrics(out):
        time.sleep(0.02)


def same(got: list[dict], want: list[dict]) -> bool:
    if [m["step"] for m in got] != [m["step"] for m in want]:
        return False
    return all(abs(a[k] - b[k]) <= 1e-6 * abs(b[k]) + 1e-7 for a, b in zip(got, want)
               for k in ("loss", "lm", "ebae", "ebar", "grad_norm"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tries", type=int, default=30)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the summary JSON here too")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="fault-campaign-"))
    sys.path.insert(0, str(ROOT))
    from llara_fast.data.prepare import PrepareOptions, prepare
    from llara_fast.io.hf import resolve_source

    data = work / "data"
    prepare(None, "wiki-sample", str(resolve_source("smollm2-135m")), 96, data,
            PrepareOptions(limit=150, progress=False, workers=1))
    ref = start(run_args(work / "ref", a.steps, data), work / "h_ref")
    first_step(ref, work / "ref")
    t0 = time.perf_counter()
    if ref.wait() != 0:
        sys.exit(f"the reference run failed: {ref.stderr.read()[-2000:]}")
    wall = time.perf_counter() - t0  # from the end of step 1 to the end of the run
    want, want_h = metrics(work / "ref"), hashes(work / "h_ref")
    tried = survived = not_interrupted = 0
    kinds = {"SIGKILL": [0, 0], "SIGTERM": [0, 0]}
    after_step: dict[int, int] = {}  # interrupted tries by the number of steps recorded when the signal landed
    i = 0
    while tried < a.tries and i < 3 * a.tries:  # --tries interrupted runs (a run that ends first is not one)
        i += 1
        out, h = work / f"try{i}", work / f"h{i}"
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        delay = rng.uniform(0.0, 0.6 * wall)  # the end of wall is the final save and the teardown
        proc = start(run_args(out, a.steps, data), h)
        first_step(proc, out)
        time.sleep(delay)
        if proc.poll() is not None:
            not_interrupted += 1
            print(f"try {i}: finished before the {sig.name} at {delay:.1f}s; not counted", flush=True)
            continue
        proc.send_signal(sig)
        rc = proc.wait()
        at = len(metrics(out))
        if rc == 0:  # it ended before the signal was delivered
            not_interrupted += 1
            print(f"try {i}: ended before the {sig.name}; not counted", flush=True)
            continue
        after_step[at] = after_step.get(at, 0) + 1
        for _ in range(3):  # resume until the run completes
            r = start(run_args(out, a.steps, data) + ["--run.resume", "true"], h)
            if r.wait() == 0:
                break
        ok = same(metrics(out), want) and all(want_h[s] == v for s, v in hashes(h).items())
        tried += 1
        survived += ok
        kinds[sig.name][0] += 1
        kinds[sig.name][1] += ok
        print(f"try {i}: {sig.name} {delay:.1f}s after step 1 (after step {at}, exit {rc}) -> "
              f"{'survived' if ok else 'DIFFERENT'}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    summary = {"bench": "fault_campaign", "tries": tried, "survived": survived, "not_interrupted": not_interrupted,
               "by_signal": {k: {"tried": v[0], "survived": v[1]} for k, v in kinds.items()},
               "by_steps_done": dict(sorted(after_step.items())),
               "steps": a.steps, "reference_training_s": round(wall, 1), "seed": a.seed,
               "command": "python benchmarks/fault_campaign.py " + " ".join(argv or sys.argv[1:])}
    print(json.dumps(summary))
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if survived == tried else 1


if __name__ == "__main__":
    sys.exit(main())
