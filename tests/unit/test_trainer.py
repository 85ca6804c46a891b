"""llara_fast/train/trainer.py pieces that need no run: the stop signals, the divergence guard,
and one in-process step of a tiny float64 run. (Runs themselves, with a real stop and resume, are
tests/e2e/test_runs.py.)"""
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


def _float64_trainer(tmp_path, dtype: str):
    """A Trainer with run.dtype ``dtype`` (either spelling) on the CPU around a tiny model (fp32 as
    loaded), built with the default loss impl (auto), plus a float64 copy of the model as loaded."""
    import copy

    from llara_fast.config import ModelArgs
    from llara_fast.model import Transformer
    from llara_fast.objectives.llara import LlaraObjective, LlaraTrainModule
    from llara_fast.pretrain import PretrainConfig
    from llara_fast.train.config import load_config
    from llara_fast.train.trainer import Trainer

    cfg = load_config(["--run.dtype", dtype, "--run.device", "cpu", "--run.out_dir", str(tmp_path / "run"),
                       "--optim.lr", "1e-2", "--optim.warmup_steps", "0"], PretrainConfig)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=80, ffn_hidden=48), attn_backend="auto")
    model.init_weights(seed=5)
    ref = copy.deepcopy(model).double()
    trainer = Trainer(cfg, "pretrain", default_steps=(2, 2))
    trainer.build(model, LlaraTrainModule(model, cfg.loss), LlaraObjective(80))
    return trainer, ref


def test_float64_run_keeps_float64_throughout(tmp_path, in_process_group):
    """--run.dtype fp64: master weights, gradients (after FSDP2's reduction), optimizer state and
    the logged loss parts and gradient norm are float64: the step's logged values equal the float64
    reference loss (impl reference) and its gradient norm to ALGEBRA_RTOL, which one fp32 rounding
    anywhere (an fp32 loss, an fp32 gradient reduction) would miss by ~1e-8."""
    import numpy as np
    import torch.distributed as dist
    from conftest import random_examples, toy_template
    from errmodel import ALGEBRA_RTOL

    from llara_fast.data.packing import pack_reference
    from llara_fast.objectives.llara import LlaraTrainModule, LossConfig

    rng = np.random.default_rng(6)
    batch = pack_reference(random_examples(rng, [9, 14, 6], 80, n_targets=(1, 8)), toy_template(80), 200)
    try:
        trainer, ref = _float64_trainer(tmp_path, "fp64")
        assert trainer.dtype == torch.float64 and trainer.fast_path["losses"] == "torch (chunked)"
        grads = []
        trainer.optimizer.register_step_pre_hook(
            lambda opt, *_: grads.extend(p.grad for g in opt.param_groups for p in g["params"]))
        stats = trainer.step([batch])
    finally:
        dist.destroy_process_group()
    params = list(trainer.module.parameters())
    assert params and all(p.dtype == torch.float64 for p in params)
    assert len(grads) == len(params) and all(g.dtype == torch.float64 for g in grads)
    assert all(s["exp_avg"].dtype == torch.float64 for s in trainer.optimizer.state.values())
    total, parts = LlaraTrainModule(ref, LossConfig(impl="reference"))(batch)
    total.backward()
    want_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
    want = torch.cat([total.detach()[None], parts]).tolist() + [float(want_norm)]
    np.testing.assert_allclose(stats.parts + [stats.grad_norm], want, rtol=ALGEBRA_RTOL, atol=0)
    assert not torch.equal(params[0].full_tensor(), next(ref.parameters()).detach())  # it trained


def test_float64_on_cuda_is_refused(monkeypatch):
    from llara_fast.errors import ConfigError
    from llara_fast.pretrain import PretrainConfig
    from llara_fast.train.config import load_config
    from llara_fast.train.trainer import init_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    run = load_config(["--run.dtype", "float64"], PretrainConfig).run
    with pytest.raises(ConfigError, match="run.dtype float64 runs on the CPU only"):
        init_run(run)
