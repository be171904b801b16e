"""The warm cache's byte budget and host tier (pipelines/cache.py), and loading from a local copy
(pipelines/loading.py): tiny demo checkpoints, CPU, exact counters."""

import builtins
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from pipelines.builders.demo import write_demo_vae
from pipelines.cache import PipelineCache, estimate_bytes
from pipelines.hashing import HashCache
from pipelines.loading import load_pipeline
from pipelines.local_copy import clean_local_copies, local_copy
from pipelines.store import ModelStore


@pytest.fixture(scope="module")
def models(tmp_path_factory, data_dir) -> tuple[ModelStore, Path]:
    """Three SD 1.5 checkpoints of equal size (copies of demo-sd15), demo-sdxl and the demo VAE."""
    root = tmp_path_factory.mktemp("cache-models")
    ckpts = root / "Stable-diffusion"
    ckpts.mkdir()
    src = data_dir / "models" / "Stable-diffusion"
    for name in ("a", "b", "c"):
        shutil.copy2(src / "demo-sd15.safetensors", ckpts / f"{name}.safetensors")
    shutil.copy2(src / "demo-sdxl.safetensors", ckpts / "xl.safetensors")
    write_demo_vae(root / "VAE")
    return ModelStore(ckpts, root / "VAE", HashCache(None)), root


@pytest.fixture(scope="module")
def sd15_bytes(models) -> int:
    """Device bytes of one demo SD 1.5 pipeline in float32."""
    store, _ = models
    cache = PipelineCache(store, device="cpu", dtype="float32", capacity=None, device_bytes=2**40)
    cache.get(store.find_checkpoint("a"))
    return cache.nbytes()


def _cache(store: ModelStore, **kw) -> PipelineCache:
    kw.setdefault("capacity", None)
    return PipelineCache(store, device="cpu", dtype="float32", **kw)


def _names(models) -> list[str]:
    return [Path(m.entry.name).stem for m in models]


def test_lru_by_bytes(models, sd15_bytes):
    store, _ = models
    a, b, c = (store.find_checkpoint(n) for n in "abc")
    estimate = estimate_bytes(a.path, "float32")
    assert abs(estimate - sd15_bytes) < 0.05 * sd15_bytes  # the header estimate is close (buffers aside)
    cache = _cache(store, device_bytes=int(2.5 * sd15_bytes))  # room for two
    cache.get(a)
    cache.get(b)
    assert cache.stats.evictions == 0 and cache.nbytes() == 2 * sd15_bytes
    cache.get(c)  # a is the least recently used
    assert _names(cache.loaded()) == ["b", "c"] and cache.stats.evictions == 1
    assert cache.get(b) is cache.peek(b)  # a hit makes b the most recent
    cache.get(a)  # now c goes
    assert _names(cache.loaded()) == ["b", "a"]
    s = cache.stats
    assert (s.misses, s.hits, s.loads, s.evictions, s.host_hits, s.host_evictions) == (4, 1, 4, 2, 0, 0)
    assert cache.nbytes() == 2 * sd15_bytes <= cache.device_budget
    assert cache.peek(c) is None and cache.parked() == [] and cache.host_nbytes() == 0
    report = cache.report()
    assert report["device_models"] == 2 and report["host_budget"] == 0 and report["misses"] == 4


def test_capacity_still_caps_checkpoints(models, sd15_bytes):
    store, _ = models
    cache = _cache(store, capacity=1, device_bytes=2**40)
    cache.get(store.find_checkpoint("a"))
    cache.get(store.find_checkpoint("b"))
    assert _names(cache.loaded()) == ["b"] and cache.stats.evictions == 1


def test_shared_modules_count_once(models, sd15_bytes):
    store, _ = models
    a, vae = store.find_checkpoint("a"), store.find_vae("demo-vae")
    cache = _cache(store, device_bytes=2**40)
    with_vae = cache.get(a, vae)
    base = cache.peek(a)
    assert base is not None and with_vae.pipe.unet is base.pipe.unet  # the VAE variant shares the UNet
    vae_bytes = with_vae.component_bytes[id(with_vae.pipe.vae)]
    assert cache.nbytes() == sd15_bytes + vae_bytes
    assert sum(base.component_bytes.values()) + sum(with_vae.component_bytes.values()) > cache.nbytes()
    # A budget for one pipeline plus the extra VAE holds both; evicting the base frees only its own VAE.
    tight = _cache(store, device_bytes=sd15_bytes + vae_bytes)
    tight.get(a, vae)
    assert tight.stats.evictions == 0 and len(tight.loaded()) == 2


def test_oversized_pipeline_loads_alone(models, sd15_bytes, caplog):
    store, _ = models
    cache = _cache(store, device_bytes=sd15_bytes // 2)
    with caplog.at_level(logging.WARNING, logger="pipelines.cache"):
        cache.get(store.find_checkpoint("a"))
    assert any("more than the device cache budget" in r.getMessage() for r in caplog.records)
    assert _names(cache.loaded()) == ["a"]
    cache.get(store.find_checkpoint("b"))
    assert _names(cache.loaded()) == ["b"] and cache.stats.evictions == 1 and cache.stats.misses == 2


class Mover:
    """Records moves instead of copying (on CPU the device is host RAM)."""

    def __init__(self) -> None:
        self.moves: list[tuple[int, str]] = []

    def __call__(self, module, device: str) -> None:
        self.moves.append((id(module), device))


def test_host_tier_accounting(models, sd15_bytes, monkeypatch):
    store, _ = models
    a, b, c = (store.find_checkpoint(n) for n in "abc")
    assert not _cache(store, host_bytes=2**30).host_tier  # on CPU the tier is off unless forced
    mover = Mover()
    cache = _cache(store, device_bytes=int(1.5 * sd15_bytes), host_bytes=int(1.5 * sd15_bytes), host_tier=True,
                   host_device="host", mover=mover)
    model_a = cache.get(a)
    a_modules = set(model_a.component_bytes)
    cache.get(b)  # a moves to host RAM
    assert _names(cache.loaded()) == ["b"] and _names(cache.parked()) == ["a"]
    assert cache.nbytes() == sd15_bytes and cache.host_nbytes() == sd15_bytes
    assert {m for m, d in mover.moves} == a_modules and {d for _, d in mover.moves} == {"host"}
    mover.moves.clear()

    def no_disk(*args, **kwargs):
        raise AssertionError("a host-tier hit read the disk")

    with monkeypatch.context() as m:
        m.setattr("pipelines.loading.load_pipeline", no_disk)
        assert cache.get(a) is model_a  # moved back: b goes to host RAM first
    assert _names(cache.loaded()) == ["a"] and _names(cache.parked()) == ["b"]
    assert [d for _, d in mover.moves].count("cpu") == len(a_modules)
    cache.get(c)  # a to host RAM; host now over budget: b (least recent) is dropped
    assert _names(cache.loaded()) == ["c"] and _names(cache.parked()) == ["a"]
    s = cache.stats
    assert (s.misses, s.hits, s.host_hits, s.loads, s.evictions, s.host_evictions) == (3, 0, 1, 3, 3, 1)
    assert cache.host_nbytes() == sd15_bytes <= cache.host_budget
    assert cache.report()["host_models"] == 1
    # A pipeline too large for host RAM is dropped, not moved.
    small = _cache(store, device_bytes=sd15_bytes, host_bytes=sd15_bytes // 2, host_tier=True, host_device="host",
                   mover=Mover())
    small.get(a)
    small.get(b)
    assert small.parked() == [] and small.stats.evictions == 1 and small.mover.moves == []


def test_cached_switch_reads_no_disk(models, monkeypatch):
    store, _ = models
    sd, xl = store.find_checkpoint("a"), store.find_checkpoint("xl")
    cache = _cache(store, capacity=2, device_bytes=2**40)
    first = {"sd": cache.get(sd), "xl": cache.get(xl)}
    loads = cache.stats.loads

    def refuse(*args, **kwargs):
        raise AssertionError("disk I/O on a cached switch")


    with monkeypatch.context() as m:
        for target in ("builtins.open", "io.open", "os.open", "safetensors.safe_open", "safetensors.torch.load_file",
                       "safetensors.torch.safe_open", "pipelines.loading.load_pipeline", "pipelines.loading.read_header"):
            m.setattr(target, refuse)
        for _ in range(3):
            assert cache.get(sd) is first["sd"]
            assert cache.get(xl) is first["xl"]
    assert builtins.open is not refuse
    assert cache.stats.loads == loads and cache.stats.hits == 6 and cache.stats.misses == 2


def _image(pipe) -> torch.Tensor:
    out = pipe("a red house", num_inference_steps=1, height=64, width=64, guidance_scale=1.0, output_type="pt",
               generator=torch.Generator().manual_seed(7))
    return out.images


def test_copy_to_local_is_the_same_model(models, tmp_path):
    store, _ = models
    path = store.find_checkpoint("a").path
    direct = load_pipeline(path)
    local = tmp_path / "local"
    timings: dict[str, float] = {}
    copied = load_pipeline(path, local_dir=local, direct_to_device=True, timings=timings)
    assert set(timings) == {"copy", "read_weights", "to_device"}
    copies = list(local.iterdir())
    assert len(copies) == 1 and copies[0].read_bytes() == path.read_bytes()
    assert copies[0].stat().st_mtime_ns == path.stat().st_mtime_ns
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(direct, name).state_dict(), getattr(copied, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert torch.equal(_image(direct), _image(copied))
    # The second load reuses the copy (no new file, same inode).
    inode = copies[0].stat().st_ino
    assert local_copy(path, local) == (copies[0], False)
    load_pipeline(path, local_dir=local)
    assert [p.stat().st_ino for p in local.iterdir()] == [inode]


def test_cache_loads_through_local_copy(models, tmp_path):
    store, _ = models
    local = tmp_path / "local"
    cache = _cache(store, device_bytes=2**40, load_options={"local_dir": local, "local_max_bytes": None,
                                                           "direct_to_device": True})
    cache.get(store.find_checkpoint("b"))
    assert len(list(local.iterdir())) == 1 and cache.stats.phase_seconds["copy"] >= 0
    assert cache.stats.phase_seconds["read_weights"] >= cache.stats.phase_seconds["copy"]


def test_stale_copies_are_replaced_and_cleaned(tmp_path):
    src = tmp_path / "mount"
    src.mkdir()
    local = tmp_path / "local"
    one = src / "one.safetensors"
    one.write_bytes(b"x" * 1000)
    first, copied = local_copy(one, local)
    assert copied and first.read_bytes() == b"x" * 1000
    # The source changes (written to a temp name and renamed, as files enter the mount): copied again.
    tmp = src / ".one.tmp"
    tmp.write_bytes(b"y" * 1200)
    os.replace(tmp, one)
    os.utime(one, ns=(time.time_ns(), first.stat().st_mtime_ns + 10**9))
    again, copied = local_copy(one, local)
    assert copied and again == first and again.read_bytes() == b"y" * 1200
    assert len(list(local.iterdir())) == 1  # the stale copy is gone, no .part left
    # A disk budget for two copies: the least recently used one goes.
    two, three = src / "two.safetensors", src / "three.safetensors"
    two.write_bytes(b"2" * 1000)
    three.write_bytes(b"3" * 1000)
    two_copy, _ = local_copy(two, local, max_bytes=2500)
    past = time.time_ns() - 10**10
    os.utime(first, ns=(past, os.stat(first).st_mtime_ns))  # `one` was used long ago
    three_copy, _ = local_copy(three, local, max_bytes=2500)
    assert sorted(p.name for p in local.iterdir()) == sorted([two_copy.name, three_copy.name])
    # The copy being loaded is kept even when it alone is over the budget; old .part files are removed.
    part = local / ".x.safetensors.1234.part"
    part.write_bytes(b"partial")
    os.utime(part, (time.time() - 3 * 86400,) * 2)
    removed = clean_local_copies(local, 500, keep=three_copy)
    assert part in removed and [p.name for p in local.iterdir()] == [three_copy.name]


def test_settings_reach_the_cache_metrics_and_health(data_dir):
    from handler.app import create_app
    from handler.settings import CacheSettings
    from tests.conftest import make_settings

    cfg = CacheSettings(device_bytes="1.5GiB", host_bytes="500MB", local_max_bytes="auto")
    assert (cfg.device_bytes, cfg.host_bytes, cfg.local_max_bytes) == (int(1.5 * 2**30), 500_000_000, None)
    assert CacheSettings().device_bytes is None and CacheSettings().host_bytes == 0
    app = create_app(make_settings(data_dir, cache={"device_bytes": "1GiB", "host_bytes": "1GiB"},
                                   record_requests=False))
    service = app.extensions["sdfunc"]
    client = app.test_client()
    assert client.get("/health").get_json()["cache"] is None  # before the first load
    cache = service.cache
    assert cache.device_budget == 2**30 and cache.host_budget == 0 and not cache.host_tier  # CPU
    service.device.run(lambda: cache.get(service.store.find_checkpoint("demo-sd15")))
    health = client.get("/health").get_json()["cache"]
    assert health["misses"] == 1 and health["device_models"] == 1 and health["device_bytes"] == cache.nbytes() > 0
    text = client.get("/metrics").get_data(as_text=True)
    for line in ("sdfunc_pipeline_cache_host_hits_total 0.0", "sdfunc_pipeline_cache_host_evictions_total 0.0",
                 "sdfunc_pipeline_cache_host_bytes 0.0", 'sdfunc_pipeline_cache_budget_bytes{tier="device"} 1.073741824e+09',
                 "sdfunc_pipeline_cache_host_models 0.0", "sdfunc_pipeline_cache_misses_total 1.0"):
        assert line in text, line
