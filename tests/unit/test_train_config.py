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
