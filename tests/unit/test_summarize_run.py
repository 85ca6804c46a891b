"""benchmarks/summarize_run.py: medians over the timed steps of a run's metrics.jsonl."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import summarize_run  # noqa: E402


def _write(run: Path, recs, config="[model]\nname = \"llama2-7b\"\nlayers = 8\nrandom_init = false\n"):
    run.mkdir()
    (run / "config.toml").write_text(config)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def _rec(step, tps, loss=10.0, mfu=None, mem=None, skipped=False):
    return {"step": step, "loss": loss, "tokens": 1000, "tokens_per_s": tps, "passages_per_s": tps / 100,
            "tflops": tps / 1000, "mfu": mfu, "mem_gb": mem, "skipped": skipped}


def test_medians_skip_warmup_and_keep_the_resumed_records(tmp_path):
    recs = [_rec(1, 5.0, loss=12.0), _rec(2, 100.0, mfu=0.2, mem=3.0), _rec(3, 999.0, mfu=0.9, mem=9.0),
            _rec(3, 300.0, mfu=0.4, mem=4.0),  # step 3 again after a resume: this record counts
            _rec(4, 200.0, mfu=0.3, mem=5.0, loss=8.5), _rec(5, 1e6, skipped=True, loss=8.0)]
    _write(tmp_path / "r", recs)
    row = dict(zip(summarize_run.COLUMNS, summarize_run.summarize(tmp_path / "r", skip=1)))
    assert row["model"] == "llama2-7b" and row["layers"] == "8" and row["steps"] == "5 (4 timed)"
    assert row["tokens/s"] == "200"  # median of 100, 300, 200 (the skipped step and step 1 are out)
    assert row["MFU"] == "30.0%" and row["peak GiB"] == "5.0" and row["loss first→last"] == "12.000→8.000"


def test_cpu_columns_and_errors(tmp_path, capsys):
    _write(tmp_path / "cpu", [_rec(1, 50.0), _rec(2, 70.0)], config="[model]\nname = \"smollm2-135m\"\n"
           "layers = 0\nrandom_init = true\n")
    row = dict(zip(summarize_run.COLUMNS, summarize_run.summarize(tmp_path / "cpu", skip=10)))
    assert row["model"] == "smollm2-135m (random init)" and row["layers"] == "all"
    assert row["tokens/s"] == "70" and row["MFU"] == "-" and row["peak GiB"] == "-"  # too few steps: the last
    bad = tmp_path / "bad"
    _write(bad, [_rec(1, 1.0)])
    with open(bad / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    assert summarize_run.main([str(bad)]) == 1
    assert f"{bad / 'metrics.jsonl'}:2: not JSON" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="metrics.jsonl: missing"):
        summarize_run.summarize(tmp_path / "nothing", skip=0)
