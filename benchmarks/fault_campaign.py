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

--integrity adds the cases of silent wrong results (issue 26), each tried once and held or not:
a diverging run (lr 1e3) stops without saving a diverged step; an input edited under the
on-the-fly cache is prepared again; two encodes / two prepares on one --out at once leave one
consistent result; a flipped bit in an embedding shard is refused by evaluate and repaired by
rerunning encode; a flipped bit in a prepared data shard is refused before training.
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
    return ["--model.name", "debug", "--model.random_init", "true", "--data.dir", str(data), "--data.token_budget",
            "500", "--optim.lr", "1e-3", "--optim.warmup_steps", "1", "--run.steps", str(steps), "--run.ckpt_every",
            "2", "--run.out_dir", str(out)]


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


def _cli(module: str, *args, cwd: Path = ROOT) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _done(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=900)
    return proc.returncode, out, err


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))


def integrity_cases(work: Path, data: Path) -> dict[str, bool]:
    """The issue-26 cases, each tried once: {name: held}."""
    from itertools import islice

    from llara_fast.data.sources import iter_wiki_sample

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_wiki_beir

    held = {}
    rc, _, err = _done(_cli("llara_fast.pretrain", *run_args(work / "div", 8, data)[:-4], "--optim.lr", "1e3",
                            "--run.steps", 8, "--run.ckpt_every", 1, "--run.out_dir", work / "div"))
    saved = sorted(p.name for p in (work / "div" / "checkpoints").glob("step_*")) if (work / "div").exists() else []
    at = int(err.split("diverged at step ")[1].split(":")[0]) if "diverged at step " in err else None
    held["divergence_stops_before_saving"] = rc == 1 and at is not None and all(int(n[5:]) < at for n in saved)
    paras = [t for _, t in islice(iter_wiki_sample(), 90)]
    src = work / "in.jsonl"
    outs = []
    for docs in (paras[:20], paras[20:90]):
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        outs.append(_done(_cli("llara_fast.pretrain", "--model.name", "debug", "--model.random_init", "true",
                               "--data.format", "text", "--data.input", src, "--data.limit", 0, "--run.steps", 1,
                               "--data.token_budget", 500, "--run.out_dir", work / "runs" / f"r{len(outs)}")))
    held["edited_input_prepared_again"] = all(o[0] == 0 and "data: preparing" in o[1] for o in outs)
    ds = write_wiki_beir(work / "ds", 60, 10)
    for name, cmd in (("encode", ("llara_fast.encode", "--model", "debug", "--corpus", ds / "corpus.jsonl",
                                  "--out", work / "emb", "--shard-size", 20, "--quiet")),
                      ("prepare", ("llara_fast.data.prepare", "--format", "wiki-sample", "--tokenizer",
                                   "smollm2-135m", "--max-len", 64, "--limit", 400, "--workers", 1, "--no-progress",
                                   "--out", work / "prep"))):
        both = [_done(p) for p in [_cli(*cmd), _cli(*cmd)]]
        ok = all(r == 0 or "in use by" in e for r, _, e in both) and any(r == 0 for r, _, _ in both)
        if name == "encode":
            r, _, _ = _done(_cli("llara_fast.evaluate", "--model", "debug", "--beir", ds, "--embeddings",
                                 work / "emb", "--quiet"))
            ok = ok and r == 0
        else:
            ok = ok and (work / "prep" / "manifest.json").is_file()
        held[f"concurrent_{name}_one_consistent_result"] = ok
    _flip(work / "emb" / "shard-00001.npy", -3)
    r1, _, e1 = _done(_cli("llara_fast.evaluate", "--model", "debug", "--beir", ds, "--embeddings", work / "emb",
                           "--quiet"))
    r2, _, e2 = _done(_cli("llara_fast.encode", "--model", "debug", "--corpus", ds / "corpus.jsonl", "--out",
                           work / "emb", "--shard-size", 20, "--quiet"))
    r3, _, _ = _done(_cli("llara_fast.evaluate", "--model", "debug", "--beir", ds, "--embeddings", work / "emb",
                          "--quiet"))
    held["corrupt_embedding_refused_then_repaired"] = (r1 != 0 and "damaged" in e1 and r2 == 0
                                                       and "shard 1 is damaged" in e2 and r3 == 0)
    shutil.copytree(data, work / "data2")
    (work / "data2" / ".verified").unlink(missing_ok=True)
    _flip(work / "data2" / "shard-00000.text.bin", 11)
    r, _, e = _done(_cli("llara_fast.pretrain", *run_args(work / "bad", 2, work / "data2")))
    held["corrupt_data_shard_refused"] = r != 0 and "does not match the checksum" in e
    return held


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tries", type=int, default=30)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the summary JSON here too")
    p.add_argument("--integrity", action="store_true", help="also the silent-wrong-result cases (issue 26)")
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
    if a.integrity:
        cases = integrity_cases(work, data)
        for name, ok in cases.items():
            print(f"integrity {name}: {'held' if ok else 'FAILED'}", flush=True)
        tried, survived = tried + len(cases), survived + sum(cases.values())
    summary = {"bench": "fault_campaign", "tries": tried, "survived": survived, "not_interrupted": not_interrupted,
               "by_signal": {k: {"tried": v[0], "survived": v[1]} for k, v in kinds.items()},
               "by_steps_done": dict(sorted(after_step.items())),
               "integrity": cases if a.integrity else None,
               "steps": a.steps, "reference_training_s": round(wall, 1), "seed": a.seed,
               "command": "python benchmarks/fault_campaign.py " + " ".join(argv or sys.argv[1:])}
    print(json.dumps(summary))
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if survived == tried else 1


if __name__ == "__main__":
    sys.exit(main())
