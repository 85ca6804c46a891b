"""Summarise a training run's metrics.jsonl (pretrain or finetune) as one markdown table row.

    python benchmarks/summarize_run.py RUN_DIR [RUN_DIR ...] [--skip 10]

Rates are medians over the steps after the first --skip (warm-up: Triton autotuning, allocator
growth, compile). Columns that a run did not measure (MFU and memory on CPU) print as "-".
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import tomllib

from llara_fast.train.report import read_metrics  # the per-step records (the plot of RUN/loss.png reads them too)

COLUMNS = ("run", "model", "layers", "steps", "tokens/step", "tokens/s", "passages/s", "TFLOP/s", "MFU",
           "peak GiB", "loss first→last")


def _median(recs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in recs if r.get(key) is not None and not r.get("skipped")]
    return statistics.median(vals) if vals else None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def rates(run_dir: Path, skip: int) -> dict:
    """A run's medians over the steps after the first ``skip`` (the last step if none is left)."""
    recs = read_metrics(run_dir)
    timed = recs[skip:] if len(recs) > skip else recs[-1:]
    return {"steps": len(recs), "timed": len(timed), "tokens_per_step": _median(timed, "tokens"),
            "passages_per_step": _median(timed, "passages"), "tokens_per_s": _median(timed, "tokens_per_s"),
            "passages_per_s": _median(timed, "passages_per_s"), "tflops": _median(timed, "tflops"),
            "mfu": _median(timed, "mfu"),
            "peak_gb": max((r["mem_gb"] for r in timed if r.get("mem_gb") is not None), default=None),
            "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"]}


def summarize(run_dir: Path, skip: int) -> list[str]:
    r = rates(run_dir, skip)
    cfg = tomllib.loads((run_dir / "config.toml").read_text()) if (run_dir / "config.toml").is_file() else {}
    model = cfg.get("model", {})
    mfu = r["mfu"]
    return [run_dir.name, str(model.get("name", "?")) + (" (random init)" if model.get("random_init") else ""),
            str(model.get("layers") or "all"), f"{r['steps']} ({r['timed']} timed)",
            _fmt(r["tokens_per_step"], ",.0f"), _fmt(r["tokens_per_s"], ",.0f"),
            _fmt(r["passages_per_s"], ",.1f"), _fmt(r["tflops"], ".3g"),
            _fmt(None if mfu is None else 100 * mfu, ".1f") + ("%" if mfu is not None else ""),
            _fmt(r["peak_gb"], ".1f"), f"{r['loss_first']:.3f}→{r['loss_last']:.3f}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the medians")
    a = ap.parse_args(argv)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for run in a.runs:
        try:
            print("| " + " | ".join(summarize(run, a.skip)) + " |")
        except (FileNotFoundError, ValueError) as e:
            print(f"summarize_run: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
