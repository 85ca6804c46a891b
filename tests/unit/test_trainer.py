"""llara_fast/train/trainer.py pieces that need no run: the stop signals. (Runs themselves, with a
real stop and resume, are tests/e2e/test_runs.py.)"""
import os
import signal

import pytest
import torch

from llara_fast.train.trainer import StopSignals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signals_set_a_flag_and_restore_the_handlers(sig):
    """Inside the block either signal only sets the flag agreed() reports (the e2e test sends
    SIGTERM to a real run); outside, the previous handlers are back."""
    before = signal.getsignal(sig)
    with StopSignals() as stop:
        assert stop.agreed(torch.device("cpu")) == 0
        os.kill(os.getpid(), sig)  # the handler runs in this (main) thread before the next line
        assert stop.signum == sig and stop.agreed(torch.device("cpu")) == sig
    assert signal.getsignal(sig) is before


class _Run:
    diverge_loss, diverge_grad_norm, diverge_patience = 100.0, 1e5, 3


def _guard(tmp_path):
    from types import SimpleNamespace

    from llara_fast.train.trainer import DivergenceGuard
    return DivergenceGuard(SimpleNamespace(cfg=SimpleNamespace(run=_Run()), out=tmp_path))


def _stats(loss, gn, skipped=False):
    from llara_fast.train.step import StepStats
    return StepStats([loss], [1.0], gn, 0.1, skipped)


def test_divergence_fires_where_the_lr_1e3_run_blows_up(tmp_path):
    """The lr 1e3 debug run of issue 26: step 1 healthy, step 2 loss 6.1e6 (grad norm 1.1e9): a
    divergence at step 2, before anything of it is saved."""
    from llara_fast.train.trainer import Diverged

    g = _guard(tmp_path)
    assert g.check(1, _stats(11.91, 1.33)) is False
    with pytest.raises(Diverged, match=r"diverged at step 2: loss 6\.1e\+06 > 100 x the median 11\.91"):
        g.check(2, _stats(6.1e6, 1.1e9))


def test_divergence_dead_model_by_gradient_norm(tmp_path):
    """Grad norm exactly 0 (a dead, uniform model) or above the threshold: suspect at once (not
    saved), a divergence after diverge_patience steps in a row; a healthy step resets the count."""
    from llara_fast.train.trainer import Diverged

    g = _guard(tmp_path)
    assert g.check(1, _stats(11.88, 2.0)) is False
    assert g.check(2, _stats(11.88, 0.0)) is True and g.check(3, _stats(11.88, 3e5)) is True
    assert g.check(4, _stats(11.0, 1.0)) is False  # the streak ends
    assert g.check(5, _stats(11.88, 0.0)) is True and g.check(6, _stats(11.88, 0.0)) is True
    with pytest.raises(Diverged, match=r"step 7: gradient norm 0 \(exactly 0\) for 3 steps in a row"):
        g.check(7, _stats(11.88, 0.0))


def test_divergence_defaults_never_fire_on_healthy_curves(tmp_path):
    """The CPU replicate run's curves (adaptation arms and every fine-tuning seed, whose
    contrastive losses swing 9x between steps) and the embedded default's shape of curve."""
    import json
    from pathlib import Path

    res = json.loads(next((Path(__file__).resolve().parents[2] / "benchmarks" / "results").glob(
        "replicate-scifact-cpu-*.json")).read_text())
    curves = [arm["loss"] for arm in res["adaptation"].values()]
    curves += [seed for arm in res["finetune_loss"].values() for seed in arm]
    assert len(curves) >= 19 and max(max(c) / min(c) for c in curves) > 9  # noisy enough to matter
    for curve in curves:
        g = _guard(tmp_path)
        for step, loss in enumerate(curve, 1):
            assert g.check(step, _stats(loss, 5.0)) is False


def test_config_paths_are_stored_absolute_and_only_paths(tmp_path, monkeypatch):
    """config.toml stores the path settings absolute (a resume works from any directory), and only
    those: a value such as data.format "text" stays as it is even where a file of that name exists."""
    from llara_fast.pretrain import PretrainConfig
    from llara_fast.train.trainer import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "text").mkdir()
    (tmp_path / "in.jsonl").write_text("{}\n")
    cfg = PretrainConfig()
    cfg.data.format, cfg.data.input, cfg.run.out_dir = "text", "in.jsonl", "runs/x"
    got = absolute_paths(cfg)
    assert got.data.format == "text" and got.model.name == "smollm2-135m"
    assert got.data.input == str(tmp_path / "in.jsonl") and got.run.out_dir == str(tmp_path / "runs" / "x")
    assert cfg.data.input == "in.jsonl"  # a copy
