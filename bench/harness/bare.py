"""The bare script: what a user who skips sdfunc writes to get one image from a checkpoint file. The cold-start
benchmark starts it the way it starts a server and compares the two clocks.

    python -m bench.harness.bare --checkpoint PATH --size N --steps N --seed N [--threads T]
                                 [--config DIR --arch sd1|sdxl] [--dtype auto|float32|float16]

Contract: `import torch, diffusers`, `from_single_file` with a shipped config folder (offline, no safety
checker), `pipe.to(device)` (CUDA when available, else CPU), one txt2img with the bench's prompt, Euler
(`EulerDiscreteScheduler.from_config`), CFG and seed, the PNG encoded in memory; then one JSON line on stdout,
`{"event": "first_image", "phases": {"imports": s, "load": s, "generate": s}, ...}`, and exit 0. Phases are
seconds on this process's clock from its first line of Python: `imports` = torch, diffusers, transformers and
the pipeline classes; `load` = the tokenizer(s), `from_single_file` and the move to the device; `generate` = the
pipeline call and the PNG. Nothing of sdfunc runs on that path: `--config`/`--arch` name the config folder and
class (the bench resolves them from the file's header beforehand, as the server does); without them the script
resolves them itself with `pipelines.loading.config_dir_for`, which costs an import of sdfunc's loading module
(outside the reported phases, not outside the process's wall time). `--dtype auto` is the server's default:
float32 on CPU, float16 on CUDA.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before any import of note: `imports` starts here

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# The bench's request (bench/harness/server.py); copied, not imported, so that this script stays bare.
PROMPT = "a red house by a lake, oil painting"
NEGATIVE_PROMPT = ""
CFG_SCALE = 7.0
SDXL_TOKENIZER_2 = {"pad_token": "!"}  # SDXL's second tokenizer (OpenCLIP bigG) pads with "!"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.harness.bare", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="single-file .safetensors checkpoint")
    p.add_argument("--size", type=int, required=True, help="square image size")
    p.add_argument("--steps", type=int, required=True, help="sampling steps")
    p.add_argument("--seed", type=int, required=True, help="torch.Generator seed")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--config", type=Path, help="diffusers config folder (default: from the file's header)")
    p.add_argument("--arch", choices=("sd1", "sdxl"), help="pipeline class (with --config)")
    p.add_argument("--dtype", choices=("auto", "float32", "float16"), default="auto",
                   help="auto = float32 on CPU, float16 on CUDA (default %(default)s)")
    a = p.parse_args(argv)
    if (a.config is None) != (a.arch is None):
        p.error("--config and --arch go together")
    return a


def resolve_config(checkpoint: Path) -> tuple[str, Path]:
    """(arch, config folder) of `checkpoint` as the server picks them (imports sdfunc's loading module)."""
    from pipelines.loading import config_dir_for

    arch, config = config_dir_for(checkpoint)
    return arch.value, config


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no internet: configs and tokenizer come from local folders
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    arch, config = (a.arch, a.config) if a.config is not None else resolve_config(a.checkpoint)
    tokenizer_dir = config.parent / "clip-tokenizer"
    imports_from = STARTED if a.config is not None else time.perf_counter()

    import diffusers
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    loaded_imports = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "float16": torch.float16}.get(
        a.dtype, torch.float16 if device == "cuda" else torch.float32)

    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(a.checkpoint), config=str(config), local_files_only=True, dtype=dtype,
            tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
            tokenizer_2=CLIPTokenizer.from_pretrained(str(tokenizer_dir), **SDXL_TOKENIZER_2),
            add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_single_file(
            str(a.checkpoint), config=str(config), local_files_only=True, dtype=dtype,
            tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()

    image = pipe(PROMPT, negative_prompt=NEGATIVE_PROMPT, width=a.size, height=a.size, num_inference_steps=a.steps,
                 guidance_scale=CFG_SCALE, generator=torch.Generator(device).manual_seed(a.seed)).images[0]
    png = io.BytesIO()
    image.save(png, format="PNG")
    done = time.perf_counter()

    phases = {"imports": loaded_imports - imports_from, "load": loaded - loaded_imports, "generate": done - loaded}
    print(json.dumps({"event": "first_image", "device": device, "dtype": str(dtype).removeprefix("torch."),
                      "diffusers": diffusers.__version__, "png_bytes": png.tell(),
                      "phases": {k: round(v, 3) for k, v in phases.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
