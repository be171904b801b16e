"""The LoRA-overhead benchmark runs end to end at a tiny scale and reports every kind with a ratio against the
base request, and its cold kind really loads adapters from disk. No timing is asserted."""

import math

from bench.lora_overhead import KINDS, markdown, parse_args, run


def test_lora_overhead_quick_run():
    cfg, _ = parse_args(["--rounds", "2", "--size", "64", "--steps", "1", "--arch", "sd15"])
    result = run(cfg, "python -m bench.lora_overhead --rounds 2")
    rows = result["archs"]["sd15"]
    assert set(rows) == set(KINDS)
    for kind in KINDS:
        assert len(rows[kind]["samples_ms"]) == 2
        assert all(math.isfinite(t) and t > 0 for t in rows[kind]["samples_ms"])
        assert rows[kind]["median_ms"] > 0
    assert rows["base"]["ratio"] == 1.0
    assert rows["cold"]["adapter_loads"] >= 2 * 3 + 2  # every timed cold request loaded its LoRA
    text = markdown(result)
    assert "| sd15 | cold |" in text and "x1.0" in text
