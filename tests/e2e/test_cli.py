"""The `sdfunc` command line, run as a user runs it (a subprocess)."""

import subprocess
import sys

from PIL import Image


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "handler.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_generate_writes_a_png_with_its_infotext(data_dir, tmp_path):
    out = tmp_path / "one.png"
    proc = run_cli("generate", "a small boat", "-o", str(out), "--data", str(data_dir), "--steps", "2",
                   "--width", "64", "--height", "64", "--seed", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    image = Image.open(out)
    assert image.size == (64, 64)
    assert image.info["parameters"].startswith("a small boat\nSteps: 2, Sampler: Euler a,")
    assert "Seed: 3," in image.info["parameters"]


def test_generate_reports_bad_input_without_traceback(data_dir, tmp_path):
    proc = run_cli("generate", "x", "-o", str(tmp_path / "x.png"), "--data", str(data_dir), "--sampler", "nope",
                   cwd=tmp_path)
    assert proc.returncode == 2
    assert "sampler_name" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_models_skips_a_folder_with_checkpoints(data_dir, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in (data_dir / "models" / "Stable-diffusion").glob("*.safetensors")}
    proc = run_cli("demo-models", "--data", str(data_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "nothing written" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_consumers_usage_and_db_commands(make_app, db_url, tmp_path):
    """Keys made by `sdfunc consumers` work over HTTP; `sdfunc usage` prints the totals of GET /billing/usage."""
    import csv
    import io
    import os

    from tests.conftest import TINY, basic

    env_cli = {**os.environ, "SDFUNC_DATABASE_URL": db_url}

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "handler.cli", *args, "--data", str(tmp_path)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, env=env_cli)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    assert cli("db", "upgrade").stdout.split("\t")[1].strip() == "0004"
    added = cli("consumers", "add", "shop-1")
    assert added.returncode == 0 and "shown once" in added.stderr
    key = added.stdout.strip()
    assert cli("consumers", "add", "shop-1").returncode == 2
    assert cli("consumers", "disable", "ghost").returncode == 2
    assert cli("consumers", "add", "ops", "--admin").returncode == 0
    listing = cli("consumers", "list").stdout.splitlines()
    assert listing[0].startswith("id\tadmin") and listing[1].startswith("ops\tTrue") and key not in "".join(listing)

    app = make_app(auth={"mode": "basic"}, billing={"prices": {"cpu": "0.5"}})
    client = app.test_client()
    for seed in (1, 2):
        assert client.post("/sdapi/v1/txt2img", json={**TINY, "seed": seed}, headers=basic("shop-1", key)).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json={**TINY, "steps": -1}, headers=basic("shop-1", key)).status_code == 422
    api = client.get("/billing/usage?group=model", headers=basic("shop-1", key)).json

    exported = cli("usage", "--consumer", "shop-1", "--group", "model", "--csv", "-")
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert [{k: str(v) for k, v in r.items() if k in rows[0]} for r in api["rows"]] == rows
    table = cli("usage", "--consumer", "shop-1").stdout.splitlines()
    total = table[-1].split()
    assert total[0] == "total" and int(total[2]) == api["totals"]["requests"] == 3
    assert total[-1] == api["totals"]["amount"]["CNY"] and int(total[-2]) == api["totals"]["billed_ms"]
    assert cli("usage", "--since", "yesterday").returncode == 2
    assert cli("db", "check").returncode == 0

    assert cli("consumers", "disable", "shop-1").returncode == 0
    assert client.get("/sdapi/v1/options", headers=basic("shop-1", key)).status_code == 403
