"""The prompt-language benchmark runs end to end at a tiny scale and reports every kind with a ratio against the
plain prompt. No timing is asserted."""

import math

from bench.prompt_language import KINDS, markdown, parse_args, run


def test_prompt_language_quick_run():
    cfg, _ = parse_args(["--rounds", "1", "--size", "64", "--steps", "2", "--arch", "sd15"])
    result = run(cfg, "python -m bench.prompt_language --rounds 1")
    rows = result["archs"]["sd15"]
    assert set(rows) == {*KINDS, "batching"}
    for kind in KINDS:
        assert len(rows[kind]["samples_ms"]) == 1 and all(math.isfinite(t) and t > 0 for t in rows[kind]["samples_ms"])
    assert rows["plain"]["ratio"] == 1.0
    assert rows["batching"]["group_ms"] > 0 and rows["batching"]["alone_ms"] > 0
    text = markdown(result)
    assert "| sd15 | and3 |" in text and "x1.0" in text and "as one 4-image job" in text
