"""bench/served_ab.py: two real servers, alternating calls, paired ratios. Here this checkout against itself, at
a tiny scale: the run works and reports what it measured (a real A/B run is in bench/RESULTS.md)."""

import json
import sys

import pytest

from bench.harness.server import REPO
from bench.served_ab import main, markdown, parse_args


@pytest.mark.e2e  # two gunicorn servers
def test_self_against_self_runs_and_reports(tmp_path):
    out, md = tmp_path / "ab.json", tmp_path / "ab.md"
    assert main(["--baseline", str(REPO), "--baseline-python", sys.executable, "--rounds", "2", "--sizes", "64",
                 "--steps", "1", "--out", str(out), "--markdown", str(md)]) == 0
    result = json.loads(out.read_text())
    [row] = result["rows"]
    assert row["size"] == 64 and row["baseline_ms"] > 0 and row["candidate_ms"] > 0 and row["paired_ratio"] > 0
    assert row["paired_ratio_p25"] <= row["paired_ratio"] <= row["paired_ratio_p75"]
    assert {w: len(v["64"]) for w, v in result["samples_ms"].items()} == {"baseline": 2, "candidate": 2}
    assert result["config"]["baseline"] == str(REPO) and result["config"]["candidate"] == str(REPO)
    assert md.read_text() == markdown(result) and "paired ratio" in md.read_text()


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--sizes", "4"], ["--sizes", "64,x"], ["--steps", "0"]])
def test_bad_arguments_are_usage_errors(argv, tmp_path):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--baseline", str(tmp_path), *argv])
    assert exc.value.code == 2


def test_a_missing_baseline_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--baseline", str(tmp_path / "nowhere")])
    assert exc.value.code == 2
