"""benchmarks/gpu_suite.py: the summary's figures are the parts' measured numbers (the parts are
throughput.py and pretrain, tested on their own; `SMOKE=1 python benchmarks/gpu_suite.py` runs the
whole suite at toy sizes on a CPU, 3 to 6 minutes)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_suite  # noqa: E402


def _tp(ours: dict, ref: dict | None = None) -> dict:
    res = {"ours": ours} | ({"reference": ref} if ref else {})
    return {"status": "ok", "seconds": 1.0, "command": "x", "json": {"device": "NVIDIA H200", "versions": {}, "results": res}}


def test_summary_figures(tmp_path):
    s = gpu_suite.Suite(tmp_path / "out", tmp_path / "runs", 10, smoke=False)
    s.results = {
        "released_both": _tp({"passages_per_s": 90.0, "mfu_ours": 0.41, "mfu_titan": 0.36, "peak_mib": 30.0,
                              "first_loss": [12.0]},
                             {"passages_per_s": 60.0, "mfu_ours": 0.27, "peak_mib": 40.0, "first_loss": [12.01]}),
        "wiki_both": _tp({"passages_per_s": 300.0, "peak_mib": 10.0}, {"passages_per_s": 100.0, "peak_mib": 20.0}),
        "released_eager": _tp({"passages_per_s": 70.0}),
        "pretrain_l8": {"status": "ok", "rates": {"tokens_per_s": 50_000.0}},
        "throughput_l8_data": _tp({"tokens_per_s": 52_000.0}),
        "wiki_eager": {"status": "failed", "rc": 1},
        "pretrain_7b_full": {"status": "skipped", "reason": "GPU memory 80 GB < 120 GB"},
    }
    r = gpu_suite.summarize(s)
    assert r["device"] == "NVIDIA H200"
    assert r["released_ratio"] == 1.5 and r["wiki_ratio"] == 3.0 and r["peak_mem_ratio"] == 0.75
    assert r["released_mfu"] == 0.41 and r["loss_step1"] == {"ours": 12.0, "reference": 12.01}
    assert r["levers_released_passages_per_s"]["default"] == 90.0
    assert r["levers_released_passages_per_s"]["eager"] == 70.0
    assert r["levers_released_passages_per_s"]["attn_flex"] is None  # a part that did not run is null
    assert abs(r["pretrain_vs_throughput"] - 50 / 52) < 1e-12
    for key in ("device", "released_ratio", "released_mfu", "wiki_ratio", "peak_mem_ratio",
                "pretrain_tokens_per_s", "throughput_tokens_per_s"):
        assert key in r  # the fields the issue names
    md = gpu_suite.summary_md(json.loads(json.dumps(r)))
    assert "| released shape: ours / reference passages/s | 1.50x |" in md
    assert "| pretrain_7b_full | skipped GPU memory 80 GB < 120 GB |" in md


def test_skips_parts_past_the_budget(tmp_path):
    s = gpu_suite.Suite(tmp_path / "out", tmp_path / "runs", 5, smoke=True)
    r = s.part("late", [sys.executable, "-c", "print(1)"], min_s=60, max_s=60)
    assert r["status"] == "skipped"
    r = s.part("quick", [sys.executable, "-c", "print('{\"a\": 1}')"], min_s=1, max_s=30)
    assert r["status"] == "ok" and r["json"] == {"a": 1}
    assert json.loads((tmp_path / "out" / "parts.json").read_text())["late"]["status"] == "skipped"
