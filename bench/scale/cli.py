"""`python -m bench <scenario>`: cold start, throughput and autoscaling against a URL or the local FC emulator.

    python -m bench coldstart  (--target URL | --local) [--reps 5] [--warm 3] ...
    python -m bench throughput (--target URL | --local) [--rates 0.5,1,2] [--level-seconds 30] ...
    python -m bench autoscale  (--target URL | --local) [--shape step:base=0,peak=2,at=5] [--duration 60] ...
    python -m bench compare RUN_A RUN_B
    python -m bench report RUN                                      (recompute a run's summary from its CSVs)
    python -m bench emulator [--port 9100] [--simulate PROFILE] ...   (the emulator alone, until Ctrl-C)
    python -m bench profile RUN --out PROFILE.json                  (a run's recorded profile, for --simulate)

`--local` starts the emulator (bench/scale/emulator.py) with real gunicorn instances on `--data` (demo models
written there when missing); add `--simulate PROFILE` for simulated instances. Each run writes
`results/<scenario>-<timestamp>/` (see bench/README.md). The exit status is 0 when the run completed, whatever
its numbers; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import time
from pathlib import Path

log = logging.getLogger("bench")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: numbers > 0")
    return values


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: 'Name: value'")
    return name.strip(), value.strip()


def _env(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: KEY=VALUE")
    return key, value


def _add_emulator_args(p: argparse.ArgumentParser, *, idle_default: float, max_default: int = 3) -> None:
    g = p.add_argument_group("local emulator (--local, and `emulator`)")
    g.add_argument("--data", type=Path, default=Path("data"),
                   help="the function's data folder; demo models are written there when it has none (default ./data)")
    g.add_argument("--simulate", type=Path, metavar="PROFILE",
                   help="simulated instances drawn from this recorded profile (bench/profiles/*.json)")
    g.add_argument("--max-instances", type=int, default=max_default,
                   help=f"instances at most; at the maximum FC answers 429 (default {max_default})")
    g.add_argument("--instance-concurrency", type=int, default=1,
                   help="requests one instance takes at once (s.yaml's instanceConcurrency is 5; default 1)")
    g.add_argument("--provisioned", type=int, default=0, help="instances always on (FC's provisioned instances)")
    g.add_argument("--idle-timeout", type=float, default=idle_default,
                   help=f"seconds before an idle on-demand instance is reclaimed (default {idle_default:g})")
    g.add_argument("--no-initialize", action="store_true", help="do not call POST /initialize before first requests")
    g.add_argument("--instance-env", type=_env, action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for gunicorn instances (repeatable), e.g. SDFUNC_AUTH__MODE=keys")
    g.add_argument("--sim-seed", type=int, default=0, help="seed of the simulated instances' draws")


def _add_target_args(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", metavar="URL", help="a deployed function's HTTP trigger, e.g. https://....fcapp.run")
    where.add_argument("--local", action="store_true", help="the local FC emulator with real gunicorn instances")
    p.add_argument("--header", type=_header, action="append", default=[], metavar="'Name: value'",
                   help="a header on every request (repeatable), e.g. 'Authorization: Bearer KEY'")
    p.add_argument("--fc-idle", type=float, default=0.0, metavar="S",
                   help="--target: seconds FC keeps an idle instance, counted in observed instance time (default 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default 600)")
    r = p.add_argument_group("request (txt2img)")
    r.add_argument("--size", type=int, default=256)
    r.add_argument("--steps", type=int, default=8)
    r.add_argument("--sampler", default="Euler")
    r.add_argument("--batch-size", type=int, default=1)
    r.add_argument("--model", help="override_settings.sd_model_checkpoint (default: the function's default)")
    p.add_argument("--results", type=Path, default=Path("results"), help="where run folders go (default ./results)")
    p.add_argument("--out", type=Path, help="this run's folder (default RESULTS/<scenario>-<timestamp>)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("coldstart", help="time to first image from zero instances, N repetitions")
    _add_target_args(p)
    _add_emulator_args(p, idle_default=600.0, max_default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warm", type=int, default=3, help="warm requests after each cold one (the steady reference)")
    p.add_argument("--idle-wait", type=float, default=0.0, metavar="S",
                   help="--target: seconds to wait between repetitions so FC reclaims the instance")

    p = sub.add_parser("throughput", help="a sweep of open-loop arrival rates")
    _add_target_args(p)
    _add_emulator_args(p, idle_default=60.0)
    p.add_argument("--rates", type=_floats, default=[0.5, 1.0, 2.0], help="requests/s per level (default 0.5,1,2)")
    p.add_argument("--level-seconds", type=float, default=30.0)
    p.add_argument("--max-per-level", type=int, default=500, help="cap on requests per level (default 500)")
    p.add_argument("--process", choices=("poisson", "uniform"), default="poisson")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("autoscale", help="a load shape over time: step, ramp, spike, diurnal")
    _add_target_args(p)
    _add_emulator_args(p, idle_default=10.0)
    p.add_argument("--shape", default="step:base=0,peak=2,at=5",
                   help="constant:rate=R | step:base=B,peak=P,at=T | ramp:start=A,end=B | "
                        "spike:base=B,peak=P,at=T,width=W | diurnal:mean=M,amplitude=A,period=S")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--settle", type=float, default=0.0, metavar="S",
                   help="seconds to keep watching after the load ends (instances being reclaimed)")
    p.add_argument("--max-requests", type=int, default=5000)
    p.add_argument("--process", choices=("poisson", "uniform"), default="poisson")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("report", help="recompute a run folder's summary and charts from its raw CSVs")
    p.add_argument("run", type=Path)

    p = sub.add_parser("compare", help="two runs side by side, as ratios B/A")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)

    p = sub.add_parser("emulator", help="run the local FC emulator until interrupted")
    _add_emulator_args(p, idle_default=60.0)
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--size", type=int, default=256, help="the request size FC's initializer warms up")
    p.add_argument("--steps", type=int, default=8, help="with --simulate: the steps of the shape served")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)

    p = sub.add_parser("profile", help="record a local run's profile for --simulate")
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name")
    return parser


def _emulator_config(args: argparse.Namespace, spec) -> object:
    from bench.scale.emulator import EmulatorConfig
    from bench.scale.profile import Profile
    from bench.scale.scenarios import default_instance_env, workdir

    profile = Profile.load(args.simulate) if args.simulate else None
    cfg = EmulatorConfig(instance_concurrency=args.instance_concurrency, max_instances=args.max_instances,
                         provisioned=args.provisioned, idle_timeout_s=args.idle_timeout,
                         initialize=not args.no_initialize, data=None if profile else args.data.resolve(),
                         workdir=None if profile else workdir(), simulate=profile, seed=args.sim_seed)
    if profile is None:
        from bench.harness.server import ensure_data

        ensure_data(cfg.data)
        cfg.instance_env = {**default_instance_env(cfg, spec), **dict(args.instance_env)}
    return cfg


_POSITIVE = ("reps", "max_per_level", "max_requests", "level_seconds", "duration", "timeout", "idle_timeout", "size",
             "steps", "batch_size")
_NOT_NEGATIVE = ("warm", "settle", "idle_wait", "fc_idle")


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in _POSITIVE:
        if getattr(args, name, 1) is not None and getattr(args, name, 1) <= 0:
            parser.error(f"--{name.replace('_', '-')}: must be > 0")
    for name in _NOT_NEGATIVE:
        if getattr(args, name, 0) < 0:
            parser.error(f"--{name.replace('_', '-')}: must be >= 0")
    if args.command == "coldstart" and getattr(args, "local", False) and args.provisioned:
        parser.error("coldstart starts from zero instances: --provisioned must be 0")
    if getattr(args, "simulate", None) and args.simulate.is_file():
        from bench.scale.profile import Profile, shape_key
        from bench.scale.scenarios import RequestSpec

        try:
            profile = Profile.load(args.simulate)
        except (ValueError, OSError) as exc:
            parser.error(f"--simulate: {exc}")
        key = shape_key(RequestSpec(size=args.size, steps=args.steps, batch_size=getattr(args, "batch_size", 1)).body(0))
        if key not in profile.generation:
            parser.error(f"--simulate: profile {profile.name} has no samples for {key} (--size/--steps/--batch-size); "
                         f"it has {', '.join(sorted(profile.generation))}")
    if getattr(args, "max_instances", 1) < 1 or getattr(args, "instance_concurrency", 1) < 1:
        parser.error("--max-instances and --instance-concurrency: at least 1")
    if not 0 <= getattr(args, "provisioned", 0) <= getattr(args, "max_instances", 1):
        parser.error("--provisioned: 0 .. --max-instances")
    if getattr(args, "simulate", None) and not args.simulate.is_file():
        parser.error(f"--simulate: no file {args.simulate}")
    if getattr(args, "target", None) and getattr(args, "simulate", None):
        parser.error("--simulate goes with --local")
    if getattr(args, "target", None) and not args.target.startswith(("http://", "https://")):
        parser.error("--target: an http(s) URL")


def masked_argv(argv: list[str]) -> list[str]:
    """The command line for reports: header values and secret-looking `--instance-env` values as ***."""
    from bench.scale.emulator import masked_env

    out, after = [], None
    for arg in argv:
        option, eq, value = arg.partition("=")
        if after is None and eq and option in ("--header", "--instance-env"):
            after, arg = option, value
            prefix = option + "="
        else:
            prefix = ""
        if after == "--header":
            arg = arg.partition(":")[0] + ": ***"
        elif after == "--instance-env":
            key, _, val = arg.partition("=")
            arg = f"{key}={masked_env({key: val})[key]}"
        out.append(prefix + arg)
        after = arg if arg in ("--header", "--instance-env") and not prefix else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    logging.basicConfig(level=getattr(args, "log_level", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = "python -m bench " + " ".join(shlex.quote(a) for a in masked_argv(sys.argv[1:] if argv is None else argv))
    if args.command == "compare":
        from bench.scale.report import compare

        sys.stdout.write(compare(args.a, args.b) + "\n")
        return 0
    if args.command == "report":
        from bench.scale.report import rewrite_run

        rewrite_run(args.run)
        sys.stdout.write((args.run / "summary.md").read_text())
        return 0
    if args.command == "profile":
        return _profile(args)
    from bench.scale.scenarios import RequestSpec

    spec = RequestSpec(size=getattr(args, "size", 256), steps=getattr(args, "steps", 8),
                       sampler=getattr(args, "sampler", "Euler"), batch_size=getattr(args, "batch_size", 1),
                       model=getattr(args, "model", None))
    if args.command == "emulator":
        return _serve_emulator(args, spec)
    return _scenario(args, spec, command)


def _scenario(args: argparse.Namespace, spec, command: str) -> int:
    from bench.scale import scenarios
    from bench.scale.load import parse_shape

    shape = None
    if args.command == "autoscale":
        try:
            shape = parse_shape(args.shape, args.duration)
        except ValueError as exc:
            sys.stderr.write(f"python -m bench autoscale: --shape: {exc}\n")
            return 2
    target = scenarios.Target(url=args.target, headers=dict(args.header), fc_idle_s=args.fc_idle,
                              timeout_s=args.timeout, emulator=None if args.target else _emulator_config(args, spec))
    out = args.out or scenarios.results_dir(args.results, args.command)
    with scenarios.Run(target, spec, progress=not args.no_progress) as run:
        if args.command == "coldstart":
            if args.target and args.idle_wait == 0 and args.reps > 1:
                log.warning("--idle-wait 0: FC keeps idle instances for minutes, so repetitions after the first "
                            "are probably warm (the report flags them); pass --idle-wait")
            summary = scenarios.coldstart(run, reps=args.reps, warm=args.warm, idle_wait_s=args.idle_wait,
                                          out_dir=out, command=command)
        elif args.command == "throughput":
            summary = scenarios.throughput(run, rates=args.rates, level_s=args.level_seconds,
                                           max_per_level=args.max_per_level, process=args.process, seed=args.seed,
                                           out_dir=out, command=command)
        else:
            summary = scenarios.autoscale(run, shape=shape, max_requests=args.max_requests, process=args.process,
                                          seed=args.seed, settle_s=args.settle, out_dir=out, command=command)
    sys.stdout.write((out / "summary.md").read_text())
    log.info("results in %s", out)
    return 0 if summary else 1


def _profile(args: argparse.Namespace) -> int:
    from bench.scale.profile import record
    from bench.scale.report import read_run

    meta, rows, instances = read_run(args.run)
    shape = meta["config"]["shape"]
    profile = record(args.name or args.run.name, rows, instances, shape,
                     {"device": (meta.get("machine") or {}).get("cuda") or "cpu", "scenario": meta["scenario"],
                      "command": meta["command"], "date": meta["started_at"], "machine": meta.get("machine")})
    profile.save(args.out)
    log.info("wrote %s (%d generation samples of %s)", args.out, len(profile.generation[shape]["gen_ms"]), shape)
    return 0


def _serve_emulator(args: argparse.Namespace, spec) -> int:
    from bench.scale.emulator import EmulatorThread

    cfg = _emulator_config(args, spec)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with EmulatorThread(cfg, port=args.port) as emu:
        log.info("FC emulator listening on %s (Ctrl-C to stop; state at %s/_emulator/state)", emu.url, emu.url)
        try:
            while not stop:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        log.info("stopping: pre-stop and SIGTERM to every instance")
    return 0
