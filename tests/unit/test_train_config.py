"""Job configs (llara_fast.train.config): every key has a help that --help prints beside its
default; TOML and --section.key overrides; clear config errors; RUN/config.toml round-trips."""
import dataclasses

import pytest
import tomllib
import torch

from llara_fast.errors import ConfigError, UserError
from llara_fast.finetune import FinetuneConfig
from llara_fast.pretrain import PretrainConfig, main
from llara_fast.train.config import compile_enabled, load_config, to_toml
from llara_fast.train.trainer import fast_path


@pytest.mark.parametrize("cls", [PretrainConfig, FinetuneConfig])
def test_every_key_has_a_help(cls):
    for sec in dataclasses.fields(cls):
        for f in dataclasses.fields(getattr(cls(), sec.name)):
            assert f.metadata.get("help"), f"{cls.__name__}: [{sec.name}] {f.name} has no help"


def test_help_prints_defaults_with_their_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "[optim]" in out and "# peak learning rate (AdamW)" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("cutoff_len = "))
    assert line.startswith("cutoff_len = 0") and "# or the released code's cutoff_len" in line
    # what the auto settings pick here (no CUDA device on the test machine)
    assert ("# on this machine (no CUDA device) the defaults pick: attention sdpa, compile off, dtype float32, "
            "reshard on, ac none, losses torch (chunked)") in out


def test_fast_path_and_compile_setting(tmp_path):
    cfg = PretrainConfig()
    assert fast_path(cfg, torch.device("cpu"), torch.float32)["compile"] is False
    assert compile_enabled("auto", "cuda") and not compile_enabled("auto", "cpu")
    assert compile_enabled("true", "cpu") and not compile_enabled("false", "cuda")
    f = tmp_path / "c.toml"
    f.write_text("[model]\ncompile = true\n")  # a TOML boolean, as older RUN/config.toml files hold
    assert load_config(["--config", str(f)], PretrainConfig).model.compile == "true"
    assert load_config(["--model.compile", "yes"], PretrainConfig).model.compile == "true"
    with pytest.raises(ConfigError, match="model.compile must be one of auto, true, false, got 'fast'"):
        load_config(["--model.compile", "fast"], PretrainConfig)
    with pytest.raises(ConfigError, match="model.attn must be one of auto, sdpa, .*got 'xformers'"):
        load_config(["--model.attn", "xformers"], PretrainConfig)


def test_overrides_toml_and_errors(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[optim]\nlr = 3\n[run]\nsteps = 7\n")
    cfg = load_config(["--config", str(f), "--run.steps", "9", "--data.cutoff-len=128", "--run.resume", "yes"],
                      PretrainConfig)
    assert (cfg.optim.lr, cfg.run.steps, cfg.data.cutoff_len, cfg.run.resume) == (3.0, 9, 128, True)
    assert tomllib.loads(to_toml(cfg))["data"]["cutoff_len"] == 128  # RUN/config.toml reads back
    assert tomllib.loads(to_toml(cfg, with_help=True)) == tomllib.loads(to_toml(cfg))
    for argv, msg in ((["--run.stepz", "3"], "did you mean run.steps"), (["--optim.lr", "fast"], "expected float"),
                      (["--nosection.x", "1"], "unknown section"), (["--run.steps"], "needs a value"),
                      (["run.steps", "3"], "expected --section.key")):
        with pytest.raises(ConfigError, match=msg):
            load_config(argv, PretrainConfig)
    assert issubclass(ConfigError, UserError)


def test_a_preset_without_weights_needs_random_init(tmp_path, capsys):
    """Presets name shapes: every preset but smollm2-135m (the one with weights) is refused without
    model.random_init, in one line naming the flag and, where there is one, the Hub id of the real
    weights, before any work (no run directory); with the flag the first log line says so."""
    from llara_fast.config import PRESETS
    from llara_fast.finetune import main as finetune_main
    from llara_fast.train.config import ModelConfig, random_weights

    for name in PRESETS:
        if PRESETS[name].weights is not None:
            assert random_weights(ModelConfig(name=name), 0) is None  # real weights: nothing said
            continue
        with pytest.raises(ConfigError, match="--model.random_init true"):
            random_weights(ModelConfig(name=name), 0)
        assert random_weights(ModelConfig(name=name, random_init=True), 3).startswith(
            f"model: random weights ({name}'s shape, seed 3;")
    assert random_weights(ModelConfig(random_init=True), 0).startswith("model: random weights (smollm2-135m's")
    assert random_weights(ModelConfig(name=str(tmp_path)), 0) is None  # a directory: its own weights
    for entry, name in ((main, "llama2-7b"), (finetune_main, "debug")):
        assert entry(["--model.name", name, "--run.out_dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "pass --model.random_init true" in err
        assert ("meta-llama/Llama-2-7b-hf" in err) == (name == "llama2-7b")
    assert not (tmp_path / "run").exists()


def test_run_length_settings(capsys):
    """run.epochs / run.steps and optim.warmup_ratio / optim.warmup_steps: one of each; the ratio
    is a share of the run's steps, rounded up; a warmup longer than the run is said."""
    from llara_fast.train.trainer import Trainer, check_run_length

    cfg = load_config(["--run.epochs", "2", "--optim.warmup_ratio", "0.1"], PretrainConfig)
    check_run_length(cfg, 2)
    for argv, msg in ((["--run.epochs", "2", "--run.steps", "5"], "run.steps 5 and run.epochs 2 are both set"),
                      (["--optim.warmup_ratio", "0.1", "--optim.warmup_steps", "3"],
                       "optim.warmup_steps 3 and optim.warmup_ratio 0.1 are both set"),
                      (["--optim.warmup_ratio", "1.5"], r"warmup_ratio must be in \[0, 1\)"),
                      (["--run.epochs", "-1"], "must be >= 0")):
        with pytest.raises(ConfigError, match=msg):
            check_run_length(load_config(argv, PretrainConfig), 2)
    fin = load_config(["--optim.warmup_ratio", "0.1"], FinetuneConfig)
    check_run_length(fin, FinetuneConfig().optim.warmup_steps)  # finetune's default (5) is not "given"
    lines = []
    fake = Trainer.__new__(Trainer)  # the schedule's arithmetic alone: no process group, no model
    fake.cfg, fake.steps, fake.log = cfg, 25, lines.append
    assert Trainer.warmup(fake) == 3  # ceil(0.1 * 25)
    fake.cfg = load_config(["--optim.warmup_steps", "5"], PretrainConfig)
    fake.steps = 3
    f = Trainer._schedule(fake)
    assert lines == ["warmup 5 steps > run 3 steps: the peak lr is never reached"]
    assert [f(s) for s in range(3)] == [0.2, 0.4, 0.6]
    fake.steps, lines[:] = 5, []
    Trainer._schedule(fake)
    assert lines == []  # the last step reaches the peak: nothing to say


def test_epoch_clock_over_query_slots():
    """Fine-tuning's clock: an epoch is one slot per record, a step takes queries x grad_accum x
    world slots; the epoch of each step is where the loader's slot is, and run.epochs' steps cover
    the epochs (the last step may start the next one)."""
    from conftest import toy_template

    from llara_fast.data.loader import ContrastiveLoader, GroupSpec
    from llara_fast.train.epochs import EpochClock

    recs = [([i + 1], [[100 + i]], [[200 + i]]) for i in range(7)]
    loader = ContrastiveLoader(recs, toy_template(300), GroupSpec(queries=2, negatives=1, grad_accum=2))
    clock = EpochClock(lambda _: len(recs), loader.slots_per_step, "")
    assert loader.slots_per_step == 4 and clock.steps_for(3) == 6 and clock.steps_for(0.5) == 1
    for step in range(1, 7):
        next(loader)
        assert clock.epoch_at(step) == pytest.approx(loader.slot / len(recs), rel=2**-50)  # float64 roundings only
    assert clock.epoch_at(5) < 3 <= clock.epoch_at(6)
