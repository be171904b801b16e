#!/usr/bin/env bash
# Record a GPU profile for `python -m bench ... --simulate`: on a machine with a CUDA GPU and this project's
# packages importable, write a random-weight SD 1.5 checkpoint with the real architecture (2.1 GB, fp16) and run
# the coldstart and throughput scenarios on the local emulator with real gunicorn instances on the GPU.
#   bash bench/scale/gpu_profile.sh OUT_DIR [SIZE] [STEPS]
# Results (summary.md, summary.json, requests.csv, charts, profile.json) go to OUT_DIR/coldstart and
# OUT_DIR/throughput. About 5 minutes on an H100.
set -euo pipefail
out=${1:?usage: gpu_profile.sh OUT_DIR [SIZE] [STEPS]}
size=${2:-512}
steps=${3:-20}
data=${SDFUNC_BENCH_DATA:-/tmp/sdfunc-gpu-data}
py=${PYTHON:-python3}
ckpt="$data/models/Stable-diffusion/realarch-sd15.safetensors"
if [ ! -f "$ckpt" ]; then
  mkdir -p "$(dirname "$ckpt")"
  "$py" -c "import sys; from pathlib import Path; from pipelines.loading import Arch; \
from pipelines.builders.realarch import write_real_arch_checkpoint; write_real_arch_checkpoint(Path(sys.argv[1]), Arch.SD1)" "$ckpt"
fi
common=(--local --data "$data" --size "$size" --steps "$steps" --no-progress
        --instance-env SDFUNC_DEFAULT_CHECKPOINT=realarch-sd15)
"$py" -m bench coldstart "${common[@]}" --reps 3 --warm 20 --out "$out/coldstart"
"$py" -m bench throughput "${common[@]}" --max-instances 1 --provisioned 1 --instance-concurrency 5 \
  --rates 0.5,1,1.5 --level-seconds 30 --out "$out/throughput"
