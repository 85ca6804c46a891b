"""benchmarks/fault_campaign.py, short (the long campaign's figures are in benchmarks/results/)."""
import json
from pathlib import Path

from conftest import run_entry

ROOT = Path(__file__).resolve().parents[2]


def test_short_fault_campaign_survives(tmp_path):
    out = tmp_path / "summary.json"
    run_entry([str(ROOT / "benchmarks" / "fault_campaign.py")], ["--tries", "1", "--steps", "4", "--seed", "3",
                                                                    "--out", str(out)], timeout=600)
    s = json.loads(out.read_text())
    assert s["survived"] == s["tries"] == 1  # an interrupted run, resumed to the reference
