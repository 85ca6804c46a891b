"""Errors that were tracebacks or misled (issue 27.9): each is one line naming what is wrong and
what to do, found before any model is loaded where it is a setting."""
import pytest
import torch

from llara_fast.config import dtype_name
from llara_fast.errors import ConfigError, InputNotFound, UserError
from llara_fast.finetune import FinetuneConfig
from llara_fast.io.load import load
from llara_fast.pretrain import PretrainConfig
from llara_fast.pretrain import main as pretrain_main
from llara_fast.train.config import load_config


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_run_device_cuda_without_cuda(tmp_path, in_process_group, capsys):
    assert pretrain_main(["--run.device", "cuda", "--model.name", "debug", "--model.random_init", "true", "--run.out_dir", str(tmp_path)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "run.device is cuda, but this machine has no usable CUDA device" in line
    assert "--run.device auto or cpu" in line


@pytest.mark.parametrize("cls,key,bad,allowed", [
    (PretrainConfig, "model.ac", "ful", "none, selective, full, got 'ful' (did you mean full?)"),
    (PretrainConfig, "model.attn", "flash", "auto, sdpa, torch_varlen, flash_attn, flex, triton"),
    (PretrainConfig, "optim.decay", "cosin", "cosine, linear, constant"),
    (PretrainConfig, "run.device", "gpu", "auto, cpu, cuda"),
    (PretrainConfig, "run.dtype", "fp16", "auto, float32 (fp32), bfloat16 (bf16), float64 (fp64)"),
    (PretrainConfig, "loss.impl", "cuda", "auto, triton, torch, reference"),
    (PretrainConfig, "loss.pooling", "avg", "max, mean"),
    (PretrainConfig, "loss.tasks", "lm", "ebae,ebar, ebae, ebar"),
    (PretrainConfig, "data.format", "jsonl", "llara-jsonl, text, wiki-sample"),
    (FinetuneConfig, "data.mining", "dense", "bm25, random"),
])
def test_enumerated_settings_are_checked_when_the_config_is_read(tmp_path, cls, key, bad, allowed):
    with pytest.raises(ConfigError, match="must be one of") as e:
        load_config([f"--{key}", bad], cls)
    assert f"command line: {key} must be one of {allowed}" in str(e.value)
    f = tmp_path / "c.toml"
    section, name = key.split(".")
    f.write_text(f'[{section}]\n{name} = "{bad}"\n')
    with pytest.raises(ConfigError, match=f"{f}: {key} must be one of"):
        load_config(["--config", str(f)], cls)


def test_a_bad_setting_stops_the_run_before_the_model_loads(tmp_path, capsys):
    assert pretrain_main(["--model.ac", "ful", "--run.out_dir", str(tmp_path / "run")]) == 2
    assert "model.ac must be one of none, selective, full" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_dtype_spellings_are_one_normaliser():
    assert load_config(["--run.dtype", "bf16"], PretrainConfig).run.dtype == "bfloat16"
    assert load_config(["--run.dtype", "FP32"], PretrainConfig).run.dtype == "float32"
    assert load_config(["--run.dtype", "bfloat16"], PretrainConfig).run.dtype == "bfloat16"
    assert [dtype_name(s) for s in ("fp16", "float16", "torch.bfloat16", "bf16", "fp32")] == [
        "float16", "float16", "bfloat16", "bfloat16", "float32"]
    with pytest.raises(UserError, match=r"must be one of float32 \(fp32\), bfloat16 \(bf16\), got 'fp16'"):
        dtype_name("fp16", ("float32", "bfloat16"))


def test_export_and_encode_take_both_dtype_spellings(tmp_path, capsys):
    from llara_fast.encode import CorpusJob, encode_corpus
    from llara_fast.io.export import main as export_main

    assert export_main(["--checkpoint", "debug", "--out", str(tmp_path / "a"), "--dtype", "bfloat16"]) == 0
    assert "(bfloat16, " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", "debug", "--out", str(tmp_path / "b"), "--dtype", "fp8"])
    assert "must be one of float32 (fp32), bfloat16 (bf16), got 'fp8'" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"embedding dtype must be one of float16 \(fp16\), float32 \(fp32\)"):
        encode_corpus(None, CorpusJob("c.jsonl", str(tmp_path / "e"), dtype="int8"))


def test_a_model_path_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(InputNotFound) as e:
        load(str(tmp_path / "runs" / "nope" / "checkpoints" / "step_0000012"))
    msg = str(e.value)
    assert "no such file or directory" in msg and "neither" not in msg
    assert "a training checkpoint (RUN/checkpoints/step_N, or a run directory RUN" in msg and "Hub model id" in msg
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputNotFound, match="a file that is not a .gguf model"):
        load(str(tmp_path / "notes.txt"))


def test_a_run_directory_without_a_complete_checkpoint(tmp_path, capsys):
    from llara_fast.io.export import main as export_main

    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000002.tmp").mkdir(parents=True)
    (run / "config.toml").write_text("[model]\n")
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "o")]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{run}: a training run without a complete checkpoint" in line and "config.json" not in line


def test_finetune_prints_no_python_warning(tmp_path, in_process_group, recwarn, capfd):
    """A fine-tuning run on pairs with bad records: the bad records are plain lines naming the field
    and the type it needs, and no warnings-module line ("path.py:N: SomeWarning: ...") is printed."""
    import json
    import re

    from llara_fast.finetune import main as finetune_main

    good = [{"query": f"q{i}", "pos": [f"passage {i}"], "neg": [f"other {i}"]} for i in range(4)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join([json.dumps({"query": 3, "pos": ["p"]})] + [json.dumps(r) for r in good]) + "\n")
    assert finetune_main(["--model.name", "debug", "--model.random_init", "true", "--data.train", str(data), "--data.queries", "2",
                          "--data.negatives", "1", "--data.max_bad_fraction", "0.5", "--run.steps", "1",
                          "--run.out_dir", str(tmp_path / "run"), "--run.export", "false"]) == 0
    out, err = capfd.readouterr()
    assert f"{data}:1: bad_type:query:str (record skipped)" in err
    assert (out + err).count("model: random weights") == 1  # the job's own line, not load()'s too
    assert [str(w.message) for w in recwarn] == []
    assert not re.search(r"\.py:\d+: \w*Warning", err), err


def test_a_preset_without_weights_says_random_weights(tmp_path, capsys):
    """encode / evaluate / mine / export on a preset without weights: one stderr line says the
    weights are random (load() says it; trained weights load silently)."""
    from llara_fast.encode import main as encode_main
    from llara_fast.io.export import main as export_main

    want = ("model: random weights (preset debug's shape, seed 0): a preset without shipped weights; pass an HF "
            "directory, .gguf or Hub id for trained weights")
    assert not encode_main(["--model", "debug", "--attn", "sdpa", "--text", "a llama"])
    assert [ln for ln in capsys.readouterr().err.splitlines() if "weights" in ln] == [want]  # (and progress bars)
    assert export_main(["--checkpoint", "debug", "--out", str(tmp_path / "exp")]) == 0
    assert one_line(capsys.readouterr().err) == want
    load(str(tmp_path / "exp"))  # the export's weights are the model's own now
    assert "random weights" not in capsys.readouterr().err
    load("debug", notice=False)
    assert capsys.readouterr().err == ""
