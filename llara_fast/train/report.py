"""What a run reports besides its log: metrics.jsonl read back, experiment trackers
(``run.report_to``: TensorBoard, Weights & Biases) and the loss-curve picture RUN/loss.png.

    report = Reporter(cfg, out, start)   # rank 0 only; start: the step the run resumes from
    report.log(rec)                      # each metrics.jsonl record, as it is written
    report.close(failed)                 # on every way out of the loop (end, stop, exception)
    plot_losses(out, parts)              # RUN/loss.png from RUN/metrics.jsonl

A metrics.jsonl record is a training step's ({"step", "loss", ...}) or an evaluation's
({"step", "eval": {"ndcg@10", ...}}); trackers get every numeric field, training ones under
``train/``, evaluation ones under ``eval/``, at the record's step (None fields, e.g. memory on
the CPU, are left out; booleans are 0/1). TensorBoard writes RUN/tensorboard; a resumed run
purges the events after the checkpoint's step (``purge_step``), as metrics.jsonl drops their
rows. W&B (``pip install wandb``; WANDB_MODE, WANDB_PROJECT and the rest as wandb reads them)
writes under RUN/wandb and continues the same W&B run on resume (its id in RUN/wandb/run_id);
W&B ignores the steps it already holds, so the re-run steps after a crash keep their first values.
"""
from __future__ import annotations

import dataclasses
import json
import math
import secrets
from pathlib import Path

from llara_fast.errors import ConfigError, UserError

REPORTERS = ("tensorboard", "wandb")


def check_report_to(value: str) -> tuple[str, ...]:
    """'none' -> (); 'tensorboard,wandb' -> ('tensorboard', 'wandb'); an unknown name is a
    ConfigError, a tracker that is not installed a UserError (both before any work)."""
    names = [v.strip().lower() for v in str(value).split(",") if v.strip()]
    if names in ([], ["none"]):
        return ()
    bad = [n for n in names if n not in REPORTERS]
    if bad:
        raise ConfigError(f"run.report_to: unknown {', '.join(map(repr, bad))}; use none, tensorboard, wandb or "
                          "several comma-separated (tensorboard,wandb)")
    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in names:
            try:
                __import__(module)
            except ImportError:
                raise UserError(f"run.report_to {name}: {module} is not installed: pip install {module}") from None
    return tuple(dict.fromkeys(names))


def scalars(rec: dict) -> dict[str, float]:
    """{tag: value} of a metrics.jsonl record: train/<field> or eval/<field>, numbers only."""
    fields, prefix = (rec["eval"], "eval") if isinstance(rec.get("eval"), dict) else (rec, "train")
    out = {}
    for k, v in fields.items():
        if k == "step" or v is None or not isinstance(v, (int, float)):
            continue
        out[f"{prefix}/{k}"] = float(v)
    return out


class Reporter:
    """The trackers of run.report_to, opened by rank 0 at the start of the loop."""

    def __init__(self, cfg, out: Path, start: int):
        names = check_report_to(cfg.run.report_to)
        self.writers = []  # (name, object with log(tags, step) and close(failed))
        try:
            for name in names:
                self.writers.append(_TensorBoard(out, start, cfg.run.resume) if name == "tensorboard"
                                    else _Wandb(cfg, out))
        except BaseException:
            self.close(failed=True)
            raise

    def log(self, rec: dict) -> None:
        tags = scalars(rec)
        for w in self.writers:
            w.log(tags, int(rec["step"]))

    def close(self, failed: bool = False) -> None:
        writers, self.writers = self.writers, []
        for w in writers:
            w.close(failed)


class _TensorBoard:
    def __init__(self, out: Path, start: int, resume: bool):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops the events of steps >= it, those a resume re-runs
        self.w = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if resume else None)

    def log(self, tags: dict, step: int) -> None:
        for tag, v in tags.items():
            self.w.add_scalar(tag, v, step)
        self.w.flush()

    def close(self, failed: bool) -> None:
        self.w.close()


class _Wandb:
    def __init__(self, cfg, out: Path):
        import wandb

        (out / "wandb").mkdir(parents=True, exist_ok=True)
        id_file = out / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if cfg.run.resume and id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n")
        try:
            self.run = wandb.init(dir=str(out), id=run_id, resume="allow", name=out.resolve().name,
                                  config=dataclasses.asdict(cfg))
        except Exception as e:  # no login, no network: one line, not wandb's traceback
            raise UserError(f"run.report_to wandb: wandb.init failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                            "run `wandb login`, or set WANDB_MODE=offline") from None

    def log(self, tags: dict, step: int) -> None:
        self.run.log(tags, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# ---- metrics.jsonl read back ------------------------------------------------------------------
def _records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (is {run_dir} a pretrain/finetune run directory?)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    return out


def read_metrics(run_dir: Path, evals: bool = False) -> list[dict]:
    """The training records of RUN/metrics.jsonl (evals: the evaluation records instead), the
    latest of each step (a resumed run repeats the steps after its checkpoint), in step order."""
    by_step = {}
    for rec in _records(run_dir):
        if "step" in rec and isinstance(rec.get("eval"), dict) == evals:
            by_step[rec["step"]] = rec
    if not by_step and not evals:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'}: no step records")
    return [by_step[k] for k in sorted(by_step)]


# ---- RUN/loss.png -----------------------------------------------------------------------------
def plot_losses(run_dir: Path, parts: tuple[str, ...] = (), out: Path | None = None) -> Path | None:
    """RUN/loss.png: the total loss and each of ``parts`` per step (skipped steps left out), the
    learning rate in a second panel, the evaluations (if any) in a third. None when the run has
    no step yet. Written next to its final name and moved into place."""
    try:
        recs = read_metrics(run_dir)
    except (FileNotFoundError, ValueError):
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state, faster import
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    evals = read_metrics(run_dir, evals=True)
    ok = [r for r in recs if not r.get("skipped")]
    panels = 3 if evals else 2
    fig = Figure(figsize=(7, 2.6 * panels))
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)
    ax = axes[0][0]
    for key in ("loss", *parts):
        pts = [(r["step"], r[key]) for r in ok if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), label="loss (total)" if key == "loss" else key, lw=2 if key == "loss" else 1,
                    marker="." if len(pts) < 50 else None)
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title(f"{Path(run_dir).resolve().name}: {len(recs)} steps")
    ax = axes[1][0]
    ax.plot([r["step"] for r in recs], [r.get("lr") for r in recs], color="tab:gray")
    ax.set_ylabel("learning rate")
    if evals:
        ax = axes[2][0]
        for name in [k for k in evals[-1]["eval"] if "@" in k]:
            ax.plot([e["step"] for e in evals], [e["eval"].get(name) for e in evals], marker="o", label=name)
        ax.set_ylabel("evaluation")
        ax.legend(fontsize=8)
    axes[-1][0].set_xlabel("step")
    axes[-1][0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / "loss.png"
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
    return out
