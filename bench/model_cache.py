"""Model cache: what a checkpoint switch costs with the warm cache, and loading from a slow (network) mount
with and without a sequential copy to local disk first.

    python -m bench.model_cache [--data DIR] [--models demo-sd15,demo-sdxl] [--switches 20] [--cold-repeats 3]
                                [--mount-model demo-sdxl|realarch-sd15|PATH] [--mount-repeats 2]
                                [--rtt-ms 0.5,2] [--mount-mb-s 200] [--readahead-kib 128] [--device auto]
                                [--threads T] [--quick] [--out FILE.json] [--markdown FILE]

1. Switch cost, in process, on `pipelines.cache.PipelineCache` (the service's cache): for each model, `cold
   miss` = `get()` on an empty cache (load from disk, page cache warm, hash already known: what a request
   waits for when its checkpoint is not warm) and `cached hit` = `get()` when every model is warm, called in
   turn for each model (each call a switch). Ratio miss / hit. On a GPU also `host hit`: a device budget for
   one model and a host tier, so every switch moves the modules back from CPU RAM (no disk read).
2. Slow mount: the same checkpoint loaded two ways through `pipelines.loading.load_pipeline`: `mmap` (the
   file as it is, mapped) and `copy` (`local_dir=`: 16 MiB sequential reads to a fresh local copy, then load
   the copy). Before each run the file's pages are dropped from the page cache (`posix_fadvise DONTNEED`), so
   both read the disk; wall time, major page faults and bytes read are measured. No network mount can be made
   here (no FUSE, NFS or device-mapper), so the mount's cost is added by a stated model from the file's real
   tensor layout (see bench/README.md): one round trip of `--rtt-ms` per read request plus the bytes at
   `--mount-mb-s`; `copy` makes ceil(size / 16 MiB) requests; `mmap` faults the file in readahead windows of
   `--readahead-kib` (NFS's default 128 KiB), one synchronous round trip each, between ceil(size / window)
   (the file is touched in file order, as safetensors' `load_file` does here) and the sum over tensors of
   ceil(tensor / window) (tensors touched in any other order share no window).
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness.cli import add_output_arguments, run_benchmark
from bench.harness.report import finish, machine_line, result_header, table
from bench.harness.throttle import drop_cache

log = logging.getLogger("bench.model_cache")

MODELS = ("demo-sd15", "demo-sdxl")
WAYS = ("mmap", "copy")
REALARCH = "realarch-sd15"


@dataclass
class BenchConfig:
    """What one run measures. The defaults take about a minute on 2 idle cores with the demo mount model."""

    data: Path | None = None  # data root (models/Stable-diffusion); default: a temp one with the demo models
    models: tuple[str, ...] = MODELS
    switches: int = 20  # cached-hit switches per model
    cold_repeats: int = 3  # cold misses per model
    mount_model: str = "demo-sdxl"  # a model name, `realarch-sd15` (2.1 GB, written once under data) or a path
    mount_repeats: int = 2  # runs per way
    rtt_ms: tuple[float, ...] = (0.5, 2.0)
    mount_mb_s: float = 200.0
    readahead_kib: int = 128
    device: str = "auto"
    threads: int | None = None


QUICK = {"switches": 3, "cold_repeats": 1, "mount_repeats": 1}


def _io() -> dict[str, int]:
    """This process's read counters (/proc/self/io) and major page faults."""
    out = {"majflt": resource.getrusage(resource.RUSAGE_SELF).ru_majflt}
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("read_bytes", "syscr", "rchar"):
                out[key] = int(value)
    except OSError:
        pass
    return out


# ---------------------------------------------------------------------------------------------------------
# 1. switch cost


def switch_cost(cfg: BenchConfig, store: Any, device: str, dtype: str) -> dict[str, Any]:
    from pipelines.cache import PipelineCache

    entries = {m: store.find_checkpoint(m) for m in cfg.models}
    for entry in entries.values():
        store.sha256(entry)  # hashed once, as sha256.json does for a mount that was seen before
    PipelineCache(store, device=device, dtype=dtype, capacity=None).get(next(iter(entries.values())))  # imports
    gc.collect()
    out: dict[str, Any] = {}
    for model, entry in entries.items():
        miss = []
        for _ in range(cfg.cold_repeats):
            cache = PipelineCache(store, device=device, dtype=dtype, capacity=None)
            t = time.perf_counter()
            cache.get(entry)
            miss.append((time.perf_counter() - t) * 1000)
            del cache
            gc.collect()
        out[model] = {"miss_ms": miss}
    cache = PipelineCache(store, device=device, dtype=dtype, capacity=None)
    for entry in entries.values():
        cache.get(entry)
    hits: dict[str, list[float]] = {m: [] for m in entries}
    for _ in range(cfg.switches):
        for model, entry in entries.items():
            t = time.perf_counter()
            cache.get(entry)
            hits[model].append((time.perf_counter() - t) * 1000)
    sizes = {Path(m.entry.name).stem: sum(m.component_bytes.values()) for m in cache.loaded()}
    assert cache.stats.loads == len(entries)  # every timed hit was a hit
    host: dict[str, list[float]] = {m: [] for m in entries}
    if device != "cpu" and len(entries) > 1:
        del cache
        gc.collect()
        tier = PipelineCache(store, device=device, dtype=dtype, capacity=None,
                             device_bytes=int(max(sizes.values()) * 1.05), host_bytes=2 * sum(sizes.values()))
        for entry in entries.values():
            tier.get(entry)
        for _ in range(cfg.switches):
            for model, entry in entries.items():
                t = time.perf_counter()
                tier.get(entry)
                host[model].append((time.perf_counter() - t) * 1000)
        assert tier.stats.loads == len(entries) and tier.stats.host_hits == cfg.switches * len(entries)
        del tier
        gc.collect()
    for model in entries:
        r = out[model]
        r["hit_ms"] = hits[model]
        r["bytes"] = sizes[model]
        r["miss_median_ms"] = float(statistics.median(r["miss_ms"]))
        r["hit_median_ms"] = float(statistics.median(r["hit_ms"]))
        r["miss_over_hit"] = r["miss_median_ms"] / max(r["hit_median_ms"], 1e-6)
        if host[model]:
            r["host_hit_ms"] = host[model]
            r["host_hit_median_ms"] = float(statistics.median(host[model]))
            r["miss_over_host_hit"] = r["miss_median_ms"] / r["host_hit_median_ms"]
    return out


# ---------------------------------------------------------------------------------------------------------
# 2. slow mount


def mount_file(cfg: BenchConfig, ckpt_dir: Path, data: Path) -> Path:
    if cfg.mount_model == REALARCH:
        from pipelines.builders.realarch import write_real_arch_checkpoint
        from pipelines.loading import Arch

        path = data / "mount" / f"{REALARCH}.safetensors"
        if not path.exists():
            log.info("writing %s (2.1 GB, random weights; once)", path)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_real_arch_checkpoint(path, Arch.SD1)
        return path
    if Path(cfg.mount_model).suffix == ".safetensors":
        return Path(cfg.mount_model)
    return ckpt_dir / f"{cfg.mount_model}.safetensors"


def mount_model(path: Path, cfg: BenchConfig) -> dict[str, Any]:
    """Read requests each way makes on the mount, from the file's tensor layout (the model of the README)."""
    from pipelines.loading import read_header
    from pipelines.local_copy import COPY_CHUNK_BYTES

    tensors, _ = read_header(path)
    sizes_ = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    window = cfg.readahead_kib * 1024
    mmap_hi = 0
    for dtype, shape in tensors.values():
        mmap_hi += math.ceil(math.prod(shape) * sizes_.get(dtype, 4) / window)
    size = path.stat().st_size
    mmap_lo = math.ceil(size / window)
    return {"file_bytes": size, "tensors": len(tensors), "mmap_requests_min": mmap_lo, "mmap_requests_max": mmap_hi,
            "copy_requests": math.ceil(size / COPY_CHUNK_BYTES), "transfer_s": size / (cfg.mount_mb_s * 1e6)}


def slow_mount(cfg: BenchConfig, path: Path, device: str, dtype: str, work: Path) -> dict[str, Any]:
    import torch

    from pipelines.loading import load_pipeline

    local = work / "local-copies"
    runs: dict[str, list[dict[str, Any]]] = {w: [] for w in WAYS}
    load_pipeline(path, device=device, dtype=getattr(torch, dtype))  # imports and tokenizers, untimed
    gc.collect()
    for r in range(cfg.mount_repeats):
        for way in (WAYS if r % 2 == 0 else WAYS[::-1]):
            shutil.rmtree(local, ignore_errors=True)
            drop_cache(path)
            timings: dict[str, float] = {}
            kw = {"local_dir": local, "local_max_bytes": None} if way == "copy" else {}
            before = _io()
            t = time.perf_counter()
            pipe = load_pipeline(path, device=device, dtype=getattr(torch, dtype), direct_to_device=True,
                                 timings=timings, **kw)
            wall = time.perf_counter() - t
            after = _io()
            del pipe
            gc.collect()
            runs[way].append({"wall_s": wall, "phases_s": timings,
                              **{k: after[k] - before[k] for k in after if k in before}})
    shutil.rmtree(local, ignore_errors=True)
    model = mount_model(path, cfg)
    out: dict[str, Any] = {"file": path.name, "model": model, "runs": runs, "simulated": {}}
    measured = {w: float(statistics.median([x["wall_s"] for x in runs[w]])) for w in WAYS}
    out["measured_median_s"] = measured
    for rtt in cfg.rtt_ms:
        lat = rtt / 1000
        copy = measured["copy"] + model["copy_requests"] * lat + model["transfer_s"]
        lo = measured["mmap"] + model["mmap_requests_min"] * lat + model["transfer_s"]
        hi = measured["mmap"] + model["mmap_requests_max"] * lat + model["transfer_s"]
        out["simulated"][str(rtt)] = {"copy_s": copy, "mmap_min_s": lo, "mmap_max_s": hi,
                                      "mmap_over_copy_min": lo / copy, "mmap_over_copy_max": hi / copy}
    return out


# ---------------------------------------------------------------------------------------------------------


def run(cfg: BenchConfig, command: str) -> dict[str, Any]:
    import torch

    from pipelines.builders.demo import DEMO_MODELS, write_demo_models
    from pipelines.hashing import HashCache
    from pipelines.store import ModelStore

    started = time.perf_counter()
    default_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    dtype = "float16" if device.startswith("cuda") else "float32"
    result = result_header("model_cache", command, cfg, {"device": device, "dtype": dtype},
                           torch.get_num_threads(), default_threads)
    result["machine"]["device"] = device
    with tempfile.TemporaryDirectory(prefix="bench-model-cache-") as tmp:
        data = cfg.data or Path(tmp) / "data"
        ckpt_dir = data / "models" / "Stable-diffusion"
        demo = [m for m in (*cfg.models, cfg.mount_model) if m in DEMO_MODELS]
        write_demo_models(ckpt_dir, kinds=sorted(set(demo)))
        store = ModelStore(ckpt_dir, data / "models" / "VAE", HashCache(data / "cache" / "sha256.json"))
        log.info("switch cost: %s on %s", ", ".join(cfg.models), device)
        result["switch"] = switch_cost(cfg, store, device, dtype)
        path = mount_file(cfg, ckpt_dir, data)
        log.info("slow mount: %s (%.0f MiB)", path.name, path.stat().st_size / 2**20)
        result["mount"] = slow_mount(cfg, path, device, dtype, Path(tmp))
    finish(result, time.perf_counter() - started)
    return result


def _mount_row(way: str, m: dict[str, Any]) -> list[Any]:
    """One way of loading from the mount: median and every wall time, the last run's phases and I/O."""
    runs = m["runs"][way]
    last = runs[-1]
    ph = last["phases_s"]
    return [way, f"{m['measured_median_s'][way]:.3f}", ", ".join(f"{x['wall_s']:.3f}" for x in runs),
            f"{ph.get('copy', 0):.3f}", f"{ph.get('read_weights', 0):.3f}", f"{ph.get('to_device', 0):.3f}",
            last.get("majflt", "-"), f"{last.get('read_bytes', 0) / 2**20:.1f}"]


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [machine_line(result, f"torch threads {result['machine']['torch_threads']}"), "",
             f"Command: `{result['command']}`", "",
             (f"Device {cfg['device']}, {cfg['dtype']}. Checkpoint switch through `PipelineCache.get` (medians; "
              f"miss = load from disk with a warm page cache, {cfg['cold_repeats']} per model; hit = "
              f"{cfg['switches']} switches per model with all models warm):"), "",
             *table(["model", "weights MiB", "cold miss ms", "cached hit ms", "miss / hit", "host hit ms",
                     "miss / host hit"],
                    ([model, f"{r['bytes'] / 2**20:.1f}", f"{r['miss_median_ms']:.1f}", f"{r['hit_median_ms']:.4f}",
                      f"{r['miss_over_hit']:,.0f}",
                      *(("-", "-") if r.get("host_hit_median_ms") is None else
                        (f"{r['host_hit_median_ms']:.1f}", f"{r['miss_over_host_hit']:.1f}"))]
                     for model, r in result["switch"].items()),
                    "lrrrrrr")]
    m = result["mount"]
    model = m["model"]
    lines += ["", (f"Slow mount: `{m['file']}` ({model['file_bytes'] / 2**20:.1f} MiB, {model['tensors']} tensors), "
                   f"page cache dropped before each run, {cfg['mount_repeats']} run(s) per way. Measured on local "
                   "disk:"), "",
              *table(["way", "wall s (median)", "runs s", "copy s", "read_weights s", "to_device s", "major faults",
                      "read MiB"], (_mount_row(way, m) for way in WAYS), "lrlrrrrr")]
    lines += ["", (f"Simulated network mount (model, see bench/README.md): {cfg['mount_mb_s']:g} MB/s, readahead "
                   f"{cfg['readahead_kib']} KiB; read requests: copy {model['copy_requests']}, mmap "
                   f"{model['mmap_requests_min']} (file order) to {model['mmap_requests_max']} (per tensor):"), "",
              *table(["RTT ms", "copy-then-load s", "mmap load s (min .. max)", "mmap / copy (min .. max)"],
                     ([rtt, f"{s['copy_s']:.2f}", f"{s['mmap_min_s']:.2f} .. {s['mmap_max_s']:.2f}",
                       f"{s['mmap_over_copy_min']:.2f} .. {s['mmap_over_copy_max']:.2f}"]
                      for rtt, s in m["simulated"].items()),
                     "rrrr")]
    return "\n".join(lines) + "\n"


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path | None, Path | None, str]:
    p = argparse.ArgumentParser(prog="python -m bench.model_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="data root (demo checkpoints written there; default: a temp dir)")
    p.add_argument("--models", default=",".join(MODELS), help="checkpoints to switch between (default %(default)s)")
    p.add_argument("--switches", type=int, default=BenchConfig.switches)
    p.add_argument("--cold-repeats", type=int, default=BenchConfig.cold_repeats)
    p.add_argument("--mount-model", default=BenchConfig.mount_model,
                   help=f"demo model, {REALARCH} (2.1 GB, written once under --data) or a .safetensors path")
    p.add_argument("--mount-repeats", type=int, default=BenchConfig.mount_repeats)
    p.add_argument("--rtt-ms", default="0.5,2", help="simulated round trips per read request (default %(default)s)")
    p.add_argument("--mount-mb-s", type=float, default=BenchConfig.mount_mb_s)
    p.add_argument("--readahead-kib", type=int, default=BenchConfig.readahead_kib)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--quick", action="store_true", help="a few repeats only (what the smoke test runs)")
    add_output_arguments(p)
    a = p.parse_args(argv)
    models = tuple(s.strip() for s in a.models.split(",") if s.strip())
    if not models or min(a.switches, a.cold_repeats, a.mount_repeats) < 1:
        p.error("--models, --switches, --cold-repeats and --mount-repeats: at least one")
    cfg = BenchConfig(data=a.data, models=models, switches=a.switches, cold_repeats=a.cold_repeats,
                      mount_model=a.mount_model, mount_repeats=a.mount_repeats, rtt_ms=_floats(a.rtt_ms),
                      mount_mb_s=a.mount_mb_s, readahead_kib=a.readahead_kib, device=a.device, threads=a.threads)
    if a.quick:
        cfg = BenchConfig(**{**cfg.__dict__, **QUICK})
    return cfg, a.out, a.markdown, a.log_level


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg, out, md_path, log_level = parse_args(args)
    run_benchmark("bench.model_cache", args, lambda command: run(cfg, command), markdown, out=out,
                  markdown_path=md_path, log_level=log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
