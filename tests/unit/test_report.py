"""Experiment tracking (run.report_to), RUN/loss.png and the evaluation during fine-tuning
(llara_fast.train.report, llara_fast.train.evaluation): tiny debug runs in this process."""
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import run_in_process, write_wiki_beir

from llara_fast.errors import ConfigError, UserError
from llara_fast.train.report import check_report_to, read_metrics

PRETRAIN = ["--model.name", "debug", "--model.random_init", "true", "--run.export", "false", "--data.limit", "16",
            "--data.token_budget", "300", "--optim.lr", "1e-3", "--optim.warmup_steps", "1"]
F32 = 2.0**-24  # TensorBoard keeps float32: one rounding of each (normal, float64) value, 2^-24 relative
FINETUNE = ["--model.name", "debug", "--model.random_init", "true", "--data.limit", "24", "--data.negatives", "2",
            "--data.queries", "4",
            "--optim.lr", "1e-3", "--optim.warmup_steps", "1", "--run.export", "false"]


@pytest.fixture
def in_process():
    """Run a job's main() here as a 1-process group (conftest.run_in_process)."""
    return run_in_process


def _png(path: Path) -> bool:
    data = path.read_bytes() if path.is_file() else b""
    return len(data) > 100 and data[:8] == b"\x89PNG\r\n\x1a\n"


def _events(run: Path) -> dict:
    """{tag: [(step, value)]} of RUN/tensorboard, read as TensorBoard reads it (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def at(step):
    def hook(trainer, s, batches, stats):
        if s == step:
            raise RuntimeError(f"injected crash after step {s}")
    return hook


def sigterm_at(step):
    def hook(trainer, s, batches, stats):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)  # seen after the next step, which is saved
    return hook


@pytest.mark.e2e  # whole training runs (in this process): the e2e tier
def test_tensorboard_holds_every_field_through_stop_crash_and_resume(tmp_path, in_process):
    """A debug pretrain with report_to tensorboard, stopped by SIGTERM after step 2, resumed and
    crashed after step 3 (not saved), resumed to the end: every numeric metrics.jsonl field is a
    TensorBoard scalar with the record's value, each step once (the crashed step 3's events
    purged on resume, as its metrics.jsonl row is); RUN/loss.png after each of the three ends."""
    from llara_fast.pretrain import main

    run = tmp_path / "runs" / "tb"
    args = [*PRETRAIN, "--run.steps", "4", "--run.ckpt_every", "2", "--run.out_dir", str(run),
            "--run.report_to", "tensorboard"]
    assert in_process(main, args, [sigterm_at(1)]) == 75
    assert _png(run / "loss.png") and [r["step"] for r in read_metrics(run)] == [1, 2]
    (run / "loss.png").unlink()
    with pytest.raises(RuntimeError, match="injected crash after step 3"):
        in_process(main, [*args, "--run.resume", "true"], [at(3)])
    assert _png(run / "loss.png") and [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    crashed3 = read_metrics(run)[-1]
    assert _events(run)["train/step_s"][-1] == (3, pytest.approx(crashed3["step_s"], rel=F32))
    (run / "loss.png").unlink()
    assert in_process(main, [*args, "--run.resume", "true"]) == 0
    assert _png(run / "loss.png")

    recs, events = read_metrics(run), _events(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[2]["step_s"] != crashed3["step_s"]
    fields = {k for r in recs for k, v in r.items() if k != "step" and v is not None}
    assert {"loss", "lm", "ebae", "ebar", "grad_norm", "lr", "tokens_per_s", "step_s", "skipped"} <= fields
    assert {f"train/{k}" for k in fields} == set(events)
    for k in fields:
        want = [(r["step"], pytest.approx(float(r[k]), rel=F32)) for r in recs]
        assert events[f"train/{k}"] == want, k


def test_report_to_names_and_missing_packages(tmp_path, monkeypatch, in_process, capsys):
    assert check_report_to("none") == () and check_report_to("") == ()
    assert check_report_to(" TensorBoard,tensorboard") == ("tensorboard",)
    with pytest.raises(ConfigError, match="run.report_to: unknown 'mlflow'; use none, tensorboard, wandb"):
        check_report_to("tensorboard,mlflow")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(UserError, match="run.report_to wandb: wandb is not installed: pip install wandb"):
        check_report_to("tensorboard,wandb")
    from llara_fast.pretrain import main

    assert in_process(main, [*PRETRAIN, "--run.out_dir", str(tmp_path / "r"), "--run.report_to", "wandb"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "llara_fast.pretrain: error: run.report_to wandb: wandb is not installed: pip install wandb"
    assert not (tmp_path / "r").exists()  # refused before any work


@pytest.mark.e2e  # whole training runs (in this process): the e2e tier
def test_wandb_offline_run(tmp_path, monkeypatch, in_process):
    """W&B in offline mode: the run's files under RUN/wandb, and a resume continues the same run id."""
    pytest.importorskip("wandb")
    from llara_fast.pretrain import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "runs" / "wb"
    args = [*PRETRAIN, "--run.out_dir", str(run), "--run.report_to", "wandb"]
    assert in_process(main, [*args, "--run.steps", "2"]) == 0
    run_id = (run / "wandb" / "run_id").read_text().strip()
    assert in_process(main, [*args, "--run.steps", "3", "--run.resume", "true"]) == 0
    assert (run / "wandb" / "run_id").read_text().strip() == run_id
    files = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))  # one per segment
    assert len(files) == 2, files
    tags = [f"train/{k}".encode() for k, v in read_metrics(run)[0].items() if k != "step" and v is not None]
    for f in files:  # wandb 0.31 has no Python reader of its run files: the tags are in the records
        data = f.read_bytes()
        assert all(t in data for t in tags), (f, [t for t in tags if t not in data])


@pytest.fixture(scope="module")
def beir_dev(tmp_path_factory) -> Path:
    return write_wiki_beir(tmp_path_factory.mktemp("beir") / "wiki", 30, 8, "dev")


@pytest.mark.e2e  # whole training runs (in this process): the e2e tier
def test_finetune_evaluates_and_keeps_the_best(tmp_path, in_process, beir_dev):
    """eval.every 1 with keep_best: an eval record per step (capped corpus, the count said is the
    count used), the same training losses as without evaluation, RUN/best from the best record's
    step, and `evaluate` on RUN/best gives that record's numbers."""
    from llara_fast.evaluate import main as evaluate_main
    from llara_fast.finetune import main

    plain, run = tmp_path / "plain", tmp_path / "ev"
    assert in_process(main, [*FINETUNE, "--run.steps", "4", "--run.out_dir", str(plain)]) == 0
    assert in_process(main, [*FINETUNE, "--run.steps", "4", "--run.out_dir", str(run), "--eval.beir", str(beir_dev),
                             "--eval.every", "1", "--eval.max_docs", "20", "--eval.keep_best", "ndcg@10",
                             "--run.report_to", "tensorboard"]) == 0
    evals = read_metrics(run, evals=True)
    assert [e["step"] for e in evals] == [1, 2, 3, 4]
    assert all(e["eval"]["documents"] == 20 and e["eval"]["queries"] == 8 for e in evals)
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(plain)]
    top = max(e["eval"]["ndcg@10"] for e in evals)
    best_step = next(e["step"] for e in evals if e["eval"]["ndcg@10"] == top)  # the first to reach it
    info = json.loads((run / "best" / "best.json").read_text())
    assert (info["step"], info["metric"], info["value"]) == (best_step, "ndcg@10", top)
    assert _png(run / "loss.png")
    events = _events(run)
    assert events["eval/ndcg@10"] == [(e["step"], pytest.approx(e["eval"]["ndcg@10"], rel=F32)) for e in evals]
    out = tmp_path / "again.json"
    assert evaluate_main(["--model", str(run / "best"), "--beir", str(beir_dev), "--split", "dev", "--max-docs",
                          "20", "--quiet", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["documents"] == 20 and again["ndcg@10"] == pytest.approx(top, abs=1e-5)  # the CLI rounds to 5 digits (5e-6)


def test_finetune_eval_errors(tmp_path, in_process, beir_dev, capsys):
    from llara_fast.finetune import main

    def err(*extra):
        code = in_process(main, [*FINETUNE, "--run.steps", "1", "--run.out_dir", str(tmp_path / "r"), *extra])
        return code, capsys.readouterr().err.strip().splitlines()[-1]

    code, line = err("--eval.beir", str(beir_dev), "--eval.split", "test")
    assert code == 1 and line.endswith("no qrels for split 'test'; available splits: dev")
    code, line = err("--eval.beir", str(tmp_path / "nowhere"))
    assert code == 1 and "eval.beir: " in line and "no such BEIR dataset directory" in line
    code, line = err("--eval.beir", str(beir_dev), "--eval.keep_best", "ndcg")
    assert code == 2 and line.startswith("config error: eval.keep_best: unknown metric 'ndcg'")


def test_resume_keeps_the_best_only_up_to_the_checkpoint(tmp_path):
    """Evaluator.begin: a resume keeps RUN/best when its step is not after the checkpoint's (the
    later steps, and their evaluations, are re-run), removes it otherwise and on a fresh start;
    a swap stopped between its two renames gets the previous best back."""
    from types import SimpleNamespace

    from llara_fast.train.evaluation import BEST_FILE, Evaluator

    def begin(start, resume=True):
        ev = object.__new__(Evaluator)
        ev.keep_best, ev.best = "ndcg@10", None
        trainer = SimpleNamespace(rank=0, out=tmp_path, cfg=SimpleNamespace(run=SimpleNamespace(resume=resume)),
                                  log=lambda msg: None)
        ev.begin(trainer, start)
        return ev.best

    def best_at(step, where="best"):
        (tmp_path / where).mkdir()
        (tmp_path / where / BEST_FILE).write_text(json.dumps({"metric": "ndcg@10", "value": 0.5, "step": step}))

    best_at(4)
    assert begin(4)["step"] == 4 and (tmp_path / "best").is_dir()
    assert begin(3) is None and not (tmp_path / "best").exists()  # step 4 is re-run from step 3
    best_at(2)
    assert begin(5, resume=False) is None and not (tmp_path / "best").exists()
    best_at(2, ".best.old")
    best_at(3, ".best.new")  # stopped after best -> .best.old, before .best.new -> best
    assert begin(3)["step"] == 2 and not (tmp_path / ".best.old").exists() and not (tmp_path / ".best.new").exists()
