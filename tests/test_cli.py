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
