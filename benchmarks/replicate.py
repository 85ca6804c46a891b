"""The paper's claim replicated at small scale (issue #19): does LLaRA adaptation (EBAE + EBAR)
make SmolLM2-135M-Instruct (the smollm2-135m preset) a better starting point for a fine-tuned retriever?

    python benchmarks/replicate.py --scale cpu --out runs/replicate      # ~1.5 h on 2 CPU cores
    python benchmarks/replicate.py --scale gpu --out runs/replicate-gpu  # one GPU

One command, identical settings for every arm:
1. adaptation of SmolLM2-135M-Instruct on the whole Wikipedia sample (all 10,033 lead paragraphs,
   chunked; EBAR's target = the next chunk), prepared once, one `python -m llara_fast.pretrain`
   run per objective (the ARMS below: the released recipe, the paper's, EBAE only, EBAR only);
2. contrastive fine-tuning (`python -m llara_fast.finetune`) of the base and of each adapted model
   on SciFact train with BM25 negatives, InfoNCE at temperature 0.01, for each of the seeds
   (the seed sets the data order and the negatives drawn);
3. evaluation (`python -m llara_fast.evaluate`) of every model, before and after fine-tuning, on
   SciFact test: all 300 queries, the full corpus of 5,183 documents (`--scale gpu`) or a subset
   of every relevant document plus random others (`--scale cpu`); BM25 on the same corpus;
4. a table (mean ± std over seeds), the adaptation curves and nDCG@10 per arm as PNG plots, and
   every figure in results.json, all under --out.

Each stage is its own subprocess whose result stays under --out: a rerun skips what is done and
resumes an interrupted adaptation from its checkpoint, so the work can be split over several
runs (e.g. two calls on a lent GPU). Each stage's log is OUT/logs/<stage>.log.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from summarize_run import read_metrics  # noqa: E402

from llara_fast.data.beir import load_beir
from llara_fast.data.pairs import bm25_search
from llara_fast.evaluate import evaluate_run, to_run

try:  # guarded: the table and results.json do not need it
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # pragma: no cover
    plt = None

BASE = "smollm2-135m"
METRICS = ("ndcg@10", "mrr@10", "recall@100")
# objective arms: (label, pretrain overrides)
ARMS = {
    "released": ("LM + EBAE + EBAR (the released recipe)", ["--loss.w_lm", "1.0"]),
    "paper": ("EBAE + EBAR (the paper's, w_lm = 0)", ["--loss.w_lm", "0.0"]),
    "ebae": ("EBAE only (w_lm = 0)", ["--loss.w_lm", "0.0", "--loss.tasks", "ebae"]),
    "ebar": ("EBAR only (w_lm = 0)", ["--loss.w_lm", "0.0", "--loss.tasks", "ebar"]),
}
# sizes; anything can be overridden on the command line
SCALES = {
    # 2 CPU cores: ~100 training tokens/s, ~350 encoded tokens/s
    "cpu": dict(adapt_steps=24, adapt_budget=1024, adapt_lr=5e-5, ft_steps=12, ft_queries=4, ft_negatives=1,
                ft_query_len=32, ft_passage_len=64, ft_lr=3e-5, eval_docs=400, eval_len=48),
    # one H100/H200, bf16 (not yet run: no GPU was lent when this was written). One epoch of
    # SciFact train (809 queries) at 16 queries per step is 51 steps.
    "gpu": dict(adapt_steps=300, adapt_budget=16384, adapt_lr=5e-5, ft_steps=51, ft_queries=16, ft_negatives=7,
                ft_query_len=64, ft_passage_len=256, ft_lr=1e-5, eval_docs=0, eval_len=512),
}


# ---- stages ------------------------------------------------------------------------------------
class Runner:
    """Runs each stage once as a subprocess, logging to OUT/logs; one progress line per stage."""

    def __init__(self, out: Path, n_stages: int, python: str):
        self.out, self.n, self.i, self.python = out, n_stages, 0, python
        self.t0 = time.perf_counter()
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, done: Path, args: list[str]) -> None:
        self.i += 1
        if done.exists():
            print(f"[{self.i}/{self.n}] {name}: done before, skipped", flush=True)
            return
        log = self.out / "logs" / f"{name}.log"
        t = time.perf_counter()
        with open(log, "a") as f:
            f.write(f"$ {' '.join(args)}\n")
            f.flush()
            rc = subprocess.call([self.python, *args], stdout=f, stderr=subprocess.STDOUT)
        if rc != 0 or not done.exists():
            tail = log.read_text().splitlines()[-15:]
            raise SystemExit(f"stage {name} failed (exit {rc}); log {log}:\n" + "\n".join(tail))
        el = time.perf_counter() - self.t0
        print(f"[{self.i}/{self.n}] {name}: {time.perf_counter() - t:.0f} s (elapsed {el / 60:.1f} min)", flush=True)


def ckpt_dir(run: Path, steps: int) -> Path:
    return run / "checkpoints" / f"step_{steps:07d}"


def adapt_args(a, arm: str, run: Path) -> list[str]:
    resume = ["--run.resume", "true"] if (run / "config.toml").exists() else []
    return ["-m", "llara_fast.pretrain", "--model.name", BASE, "--data.dir", str(a.out / "wiki"),
            "--data.token_budget", str(a.adapt_budget), "--run.steps", str(a.adapt_steps),
            "--optim.lr", str(a.adapt_lr), "--run.ckpt_every", str(max(1, a.adapt_steps // 2)),
            "--run.keep_checkpoints", "1",
            "--run.out_dir", str(run), *ARMS[arm][1], *resume]


def finetune_args(a, model: str, seed: int, run: Path) -> list[str]:
    over = ["--run.overwrite", "true"] if run.exists() else []  # an interrupted fine-tune starts over
    return ["-m", "llara_fast.finetune", "--model.name", model, "--data.beir", a.beir, "--data.split", "train",
            "--data.mining", "bm25", "--data.queries", str(a.ft_queries), "--data.negatives", str(a.ft_negatives),
            "--data.query_max_len", str(a.ft_query_len), "--data.passage_max_len", str(a.ft_passage_len),
            "--data.seed", str(seed), "--run.seed", str(seed), "--run.steps", str(a.ft_steps),
            "--optim.lr", str(a.ft_lr), "--optim.warmup_steps", str(max(1, a.ft_steps // 10)),
            "--run.out_dir", str(run), *over]


def evaluate_args(a, model: str, out_json: Path) -> list[str]:
    return ["-m", "llara_fast.evaluate", "--model", model, "--beir", a.beir, "--split", "test",
            "--max-docs", str(a.eval_docs), "--max-len", str(a.eval_len), "--quiet", "--out", str(out_json)]


def bm25_row(a) -> dict:
    """BM25 over the evaluation corpus (the same subset), untruncated texts, our metrics."""
    data = load_beir(a.beir, "test").subset(a.eval_docs, 0)
    idx, scores = bm25_search(data.doc_texts, data.query_texts, 1000)  # (Q, k) each
    run = to_run(data.query_ids, data.doc_ids, scores, idx)
    ev = evaluate_run(data.qrels, run, METRICS)
    return {m: ev.means[m] for m in METRICS} | {"documents": len(data.doc_ids), "queries": ev.n_queries}


# ---- the report --------------------------------------------------------------------------------
def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def collect(a, seeds: list[int]) -> dict:
    ev = a.out / "eval"
    res = {"zero_shot": {}, "finetuned": {}, "adaptation": {}, "finetune_loss": {}}
    for start in ["base", *a.arms]:
        res["zero_shot"][start] = json.loads((ev / f"{start}.json").read_text())
        rows = [json.loads((ev / f"{start}+ft-s{s}.json").read_text()) for s in seeds]
        res["finetuned"][start] = {m: [r[m] for r in rows] for m in METRICS}
        res["finetune_loss"][start] = [[r["loss"] for r in read_metrics(a.out / f"ft-{start}-s{s}")]
                                       for s in seeds]
    for arm in a.arms:
        res["adaptation"][arm] = {k: [r[k] for r in read_metrics(a.out / f"adapt-{arm}")]
                                  for k in ("loss", "lm", "ebae", "ebar")}
    return res


def _fmt(xs: list[float]) -> str:
    m, s = mean_std(xs)
    return f"{m:.4f} ± {s:.4f}" if not math.isnan(s) else f"{m:.4f}"


def report(a, res: dict, bm25: dict, seeds: list[int]) -> str:
    zs = res["zero_shot"]
    corpus = zs["base"].get("corpus", "")
    lines = [
        "| model | " + " | ".join(METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
        "| BM25 | " + " | ".join(f"{bm25[m]:.4f}" for m in METRICS) + " |",
    ]
    for start in ["base", *a.arms]:
        label = "base SmolLM2-135M-Instruct" if start == "base" else f"adapted: {ARMS[start][0]}"
        lines.append(f"| {label} | " + " | ".join(f"{zs[start][m]:.4f}" for m in METRICS) + " |")
    for start in ["base", *a.arms]:
        label = "base + FT" if start == "base" else f"adapted ({start}) + FT"
        lines.append(f"| {label} | " + " | ".join(_fmt(res["finetuned"][start][m]) for m in METRICS) + " |")
    curves = ["| arm | " + " | ".join(f"{k} first → last (mean of last 4)" for k in ("lm", "ebae", "ebar")) + " |",
              "|---|---|---|---|"]
    for arm, c in res["adaptation"].items():
        curves.append(f"| {arm} | " + " | ".join(
            "not computed (w_lm = 0)" if k == "lm" and not any(c[k]) else
            f"{c[k][0]:.3f} → {c[k][-1]:.3f} ({statistics.fmean(c[k][-4:]):.3f})" for k in ("lm", "ebae", "ebar")) + " |")
    return "\n".join([
        f"Corpus: SciFact test, {zs['base']['queries']} queries, {zs['base']['documents']} documents "
        f"({corpus}); texts cut to {a.eval_len} tokens for the encoders (BM25 reads them whole).",
        f"Fine-tuned rows: mean ± std over seeds {seeds}.", "", *lines, "",
        "Adaptation losses (each step sees new passages, so single steps are noisy):", "", *curves])


def plot(res: dict, bm25: dict, path_curves: Path, path_bars: Path) -> None:
    """The adaptation losses per arm, and nDCG@10 per starting point (zero-shot and fine-tuned)."""
    if plt is None:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for arm, c in res["adaptation"].items():
        for ax, k in zip(axes, ("lm", "ebae", "ebar")):
            if any(c[k]):  # w_lm = 0 arms do not compute the LM loss
                steps = range(1, len(c[k]) + 1)
                line, = ax.plot(steps, c[k], alpha=0.3, marker=".")
                smooth = [statistics.fmean(c[k][max(0, i - 3):i + 1]) for i in range(len(c[k]))]  # mean of the last 4
                ax.plot(steps, smooth, color=line.get_color(), label=arm)
    for ax, k in zip(axes, ("LM", "EBAE", "EBAR")):
        ax.set_title(f"{k} loss during adaptation (line: mean of the last 4 steps)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path_curves, dpi=120)
    plt.close(fig)

    starts = list(res["zero_shot"])
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = range(len(starts))
    ax.bar([i - 0.2 for i in x], [res["zero_shot"][s]["ndcg@10"] for s in starts], 0.4, label="zero-shot")
    ft = [mean_std(res["finetuned"][s]["ndcg@10"]) for s in starts]
    ax.bar([i + 0.2 for i in x], [m for m, _ in ft], 0.4, yerr=[0 if math.isnan(s) else s for _, s in ft],
           capsize=4, label="+ fine-tuning (mean ± std over seeds)")
    for i, s in enumerate(starts):  # every seed as a dot
        ys = res["finetuned"][s]["ndcg@10"]
        ax.scatter([i + 0.2] * len(ys), ys, color="black", s=8, zorder=3)
    ax.axhline(bm25["ndcg@10"], color="gray", linestyle="--", label="BM25")
    ax.set_xticks(list(x), starts)
    ax.set_ylabel("nDCG@10, SciFact test")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_bars, dpi=120)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=SCALES, default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("runs/replicate"))
    p.add_argument("--beir", default="../shared/data/beir/scifact")
    p.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds (comma list)")
    p.add_argument("--arms", default=",".join(ARMS), help="adaptation arms (comma list of %s)" % ", ".join(ARMS))
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each fine-tuning run's last checkpoint (by default only its export stays: 1.6 GB less each)")
    p.add_argument("--wiki-limit", type=int, default=0, help="Wikipedia paragraphs to adapt on (0: all 10,033)")
    for k, v in SCALES["cpu"].items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=None, help=f"(cpu {v}, gpu {SCALES['gpu'][k]})")
    a = p.parse_args(argv)
    a.arms = [x for x in a.arms.split(",") if x]
    for k, v in SCALES[a.scale].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    unknown = set(a.arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"--arms: unknown {sorted(unknown)} (known: {', '.join(ARMS)})")
    seeds = [int(s) for s in a.seeds.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "eval").mkdir(exist_ok=True)
    starts = {"base": BASE} | {arm: str(ckpt_dir(a.out / f"adapt-{arm}", a.adapt_steps)) for arm in a.arms}
    n = 1 + len(a.arms) + len(starts) * (1 + 2 * len(seeds))
    run = Runner(a.out, n, sys.executable)
    t0 = time.perf_counter()

    run("prepare-wiki", a.out / "wiki" / "manifest.json",
        ["-m", "llara_fast.data.prepare", "--format", "wiki-sample", "--tokenizer", BASE, "--max-len", "128",
         *(["--limit", str(a.wiki_limit)] if a.wiki_limit > 0 else []), "--out", str(a.out / "wiki"), "--no-progress"])
    for arm in a.arms:
        r = a.out / f"adapt-{arm}"
        run(f"adapt-{arm}", ckpt_dir(r, a.adapt_steps) / "COMPLETE", adapt_args(a, arm, r))
    for start, model in starts.items():
        run(f"eval-{start}", a.out / "eval" / f"{start}.json", evaluate_args(a, model, a.out / "eval" / f"{start}.json"))
    for seed in seeds:  # seed by seed: an interrupted run still holds whole seeds
        for start, model in starts.items():
            ft = a.out / f"ft-{start}-s{seed}"
            run(f"ft-{start}-s{seed}", ft / "export" / "config.json", finetune_args(a, model, seed, ft))
            js = a.out / "eval" / f"{start}+ft-s{seed}.json"
            run(f"eval-{start}+ft-s{seed}", js, evaluate_args(a, str(ft / "export"), js))
            if not a.keep_checkpoints:  # 1.6 GB each at SmolLM2 size; the export is what is evaluated
                shutil.rmtree(ft / "checkpoints", ignore_errors=True)

    bm25 = bm25_row(a)
    res = collect(a, seeds)
    table = report(a, res, bm25, seeds)
    plot(res, bm25, a.out / "adaptation.png", a.out / "ndcg.png")
    settings = {k: getattr(a, k) for k in SCALES["cpu"]} | {"scale": a.scale, "seeds": seeds, "arms": a.arms,
                                                             "wiki_limit": a.wiki_limit}
    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    (a.out / "results.json").write_text(json.dumps({"settings": settings, "env": env, "bm25": bm25, **res,
                                                    "wall_s": round(time.perf_counter() - t0, 1)}, indent=1))
    (a.out / "results.md").write_text(table + "\n")
    print(table)
    print(f"\nresults: {a.out / 'results.md'}, {a.out / 'results.json'}, plots {a.out / 'adaptation.png'}, "
          f"{a.out / 'ndcg.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
