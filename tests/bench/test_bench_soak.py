"""bench/soak.py runs a real server at its maximum queue depth and reports memory, threads, descriptors and
answers; a short run here checks it works and that its checks hold (the minutes-long run is in RESULTS.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # a real gunicorn server under load

REPO = Path(__file__).resolve().parents[2]


def test_short_soak_holds_its_checks(data_dir, tmp_path):
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--data", str(data_dir), "--minutes", "0.35", "--warmup-minutes", "0.2",
         "--sample-seconds", "1.5", "--max-waiting", "2", "--out", str(out), "--markdown", str(tmp_path / "soak.md")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert summary["ok_all"] and all(summary["checks"].values())
    assert summary["ok"] > 0 and summary["shed_429"] > 0  # 4 clients against 1 running + 2 waiting: some shed
    assert summary["five_xx"] == 0 and summary["requests"] == sum(result["statuses"].values())
    assert len(result["samples"]) >= 5 and all(s["rss_mib"] > 0 and s["fds"] > 0 for s in result["samples"])
    # descriptors are told apart: the clients' sockets and the database's pooled files have bounds of their own
    assert all(s["socket_fds"] + s["database_fds"] + s["other_fds"] == s["fds"] for s in result["samples"])
    assert max(s["socket_fds"] for s in result["samples"]) >= 2  # the listener and at least one client
    assert {"fds_not_growing", "sockets_bounded", "database_fds_bounded"} <= set(summary["checks"])
    assert "RSS MiB" in (tmp_path / "soak.md").read_text()
