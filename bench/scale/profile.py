"""A recorded profile: what a real run measured, for simulated instances to draw from.

A profile is JSON: `name`, `source` (what was measured: device, model, command, date), `start_ms` (process
start to `/health` answering, per instance), `initialize_ms` (`POST /initialize`, per instance) and
`generation`, per request shape (`shape_key`): `gen_ms` (device time, from `Server-Timing: gen`) and
`overhead_ms` (the rest of the server's time: `total - gen - queue`). Simulated instances resample these
values (bootstrap), so a simulation reproduces the distributions of the run it was recorded from, and no more:
it knows nothing of a load the real run did not see.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def shape_key(request: dict[str, Any]) -> str:
    """`WxH@steps*images` of a txt2img body, with the A1111 defaults (512x512, 20 steps, 1 image)."""
    width = int(request.get("width") or 512)
    height = int(request.get("height") or 512)
    steps = int(request.get("steps") or 20)
    images = int(request.get("batch_size") or 1) * int(request.get("n_iter") or 1)
    return f"{width}x{height}@{steps}*{images}"


@dataclass
class Profile:
    name: str
    source: dict[str, Any] = field(default_factory=dict)
    start_ms: list[float] = field(default_factory=list)
    initialize_ms: list[float] = field(default_factory=list)
    generation: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def sample(self, what: str, rng: random.Random) -> float:
        """One value of `start_ms` or `initialize_ms` (0 when the profile has none)."""
        values = getattr(self, what)
        return rng.choice(values) if values else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "start_ms": self.start_ms,
                "initialize_ms": self.initialize_ms, "generation": self.generation}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Profile:
        """Read a profile; ValueError names what is missing."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("generation"), dict) or not data["generation"]:
            raise ValueError(f"{path}: not a profile (no generation samples)")
        for key, samples in data["generation"].items():
            if not samples.get("gen_ms"):
                raise ValueError(f"{path}: shape {key} has no gen_ms samples")
        return cls(name=data.get("name") or Path(path).stem, source=data.get("source") or {},
                   start_ms=list(data.get("start_ms") or []), initialize_ms=list(data.get("initialize_ms") or []),
                   generation=data["generation"])


def record(name: str, rows: list[dict[str, Any]], instances: list[dict[str, Any]], shape: str,
           source: dict[str, Any]) -> Profile:
    """A profile from a real run's rows and instances: every successful, non-simulated request of the run
    (all sent with the request shape `shape`) gives one gen_ms and overhead_ms; every instance its start_ms
    and initialize_ms."""
    gen, overhead = [], []
    for row in rows:
        if not row["ok"] or row["simulated"] or row["gen_ms"] is None:
            continue
        gen.append(round(row["gen_ms"], 1))
        if row["server_ms"] is not None:
            rest = row["server_ms"] - row["gen_ms"] - (row["queue_ms"] or 0.0) - (row["load_ms"] or 0.0)
            overhead.append(round(max(0.0, rest), 1))
    if not gen:
        raise ValueError("no successful requests with Server-Timing to record a profile from")
    return Profile(
        name=name, source=source,
        start_ms=[round(i["start_ms"], 1) for i in instances if i.get("start_ms") is not None],
        initialize_ms=[round(i["initialize_ms"], 1) for i in instances if i.get("initialize_ms") is not None],
        generation={shape: {"gen_ms": gen, "overhead_ms": overhead}},
    )
