"""Golden outputs of the user-facing jobs, for refactors that must not change behaviour:

    .venv/bin/python scripts/golden_outputs.py OUT_DIR [--skip-default]
    .venv/bin/python scripts/golden_outputs.py --compare BEFORE/golden.json AFTER/golden.json

Runs, as users do (subprocesses, offline): a 2-process debug pretrain (per-step losses), the
export of its checkpoint (sha256 of every tensor), a debug finetune (per-step losses, its
export's tensors), an evaluate JSON on a SciFact subset, and the embedded default's loss at
step 12 (a few minutes on 2 CPU cores; --skip-default leaves it out). Writes OUT_DIR/golden.json
and keeps the runs (OUT_DIR/pretrain/checkpoints/... is a checkpoint of the code that wrote
it, for "an old checkpoint still loads"). Figures are fp32 on this machine's BLAS: compare
two runs on the same machine only."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = Path(os.environ.get("LLARA_FAST_SCIFACT", ROOT.parent / "shared" / "data" / "beir" / "scifact"))
DEBUG = ["--model.name", "debug", "--model.random_init", "true", "--optim.lr", "1e-3", "--optim.warmup_steps", "1"]
TIMING = ("tokens_per_s", "passages_per_s", "queries_per_s", "tflops", "mfu", "mem_gb", "loader_wait_s", "seconds",
          "wall_s", "timing", "lr_time")


def sh(args: list[str], nproc: int = 1) -> None:
    head = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29533"]
            if nproc > 1 else [sys.executable])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print("+", " ".join(args), flush=True)
    subprocess.run(head + args, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def losses(run: Path) -> list[dict]:
    keep = ("step", "loss", "lm", "ebae", "ebar", "accuracy", "grad_norm", "lr", "tokens", "passages", "queries")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in keep if k in r} for r in rows]


def tensors(export_dir: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    out = {}
    for f in sorted(export_dir.glob("*.safetensors")):
        for k, v in sorted(load_file(f).items()):
            out[k] = hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return out


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items()
                if k not in TIMING and k != "model" and "per_s" not in k and "seconds" not in k}  # model: a path
    return obj


def record(out: Path, skip_default: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    g = {}
    data = out / "data"
    sh(["-m", "llara_fast.data.prepare", "--format", "wiki-sample", "--tokenizer", "smollm2-135m", "--max-len", "96",
        "--limit", "150", "--out", str(data), "--workers", "1", "--no-progress", "--overwrite"])
    pre = out / "pretrain"
    sh(["-m", "llara_fast.pretrain", *DEBUG, "--data.dir", str(data), "--data.token_budget", "500",
        "--run.steps", "4", "--run.out_dir", str(pre)], nproc=2)
    g["pretrain_2proc"] = losses(pre)
    sh(["-m", "llara_fast.export", "--checkpoint", str(pre / "checkpoints" / "step_0000004"), "--out",
        str(out / "pretrain_export"), "--overwrite"])
    g["pretrain_export"] = tensors(out / "pretrain_export")
    fin = out / "finetune"
    sh(["-m", "llara_fast.finetune", *DEBUG, "--data.limit", "40", "--run.steps", "3", "--run.out_dir", str(fin)])
    g["finetune"] = losses(fin)
    g["finetune_export"] = tensors(fin / "export")
    ev = out / "evaluate.json"
    sh(["-m", "llara_fast.evaluate", "--model", str(fin / "export"), "--beir", str(SCIFACT), "--max-docs", "60",
        "--out", str(ev), "--quiet", "--attn", "sdpa"])
    g["evaluate"] = strip(json.loads(ev.read_text()))
    if not skip_default:
        sh(["-m", "llara_fast.pretrain", "--run.out_dir", str(out / "default")])
        g["default_step12"] = losses(out / "default")[-1]
    (out / "golden.json").write_text(json.dumps(g, indent=1, sort_keys=True))
    return g


def compare(a: Path, b: Path) -> int:
    x, y = strip(json.loads(a.read_text())), strip(json.loads(b.read_text()))
    bad = [k for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
    for k in bad:
        print(f"DIFFERENT: {k}\n  before: {json.dumps(x.get(k))[:600]}\n  after:  {json.dumps(y.get(k))[:600]}")
    print("identical" if not bad else f"{len(bad)} of {len(set(x) | set(y))} outputs differ")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?")
    p.add_argument("--skip-default", action="store_true")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    a = p.parse_args()
    if a.compare:
        return compare(Path(a.compare[0]), Path(a.compare[1]))
    if not a.out:
        p.error("OUT_DIR is required")
    record(Path(a.out), a.skip_default)
    return 0


if __name__ == "__main__":
    sys.exit(main())
