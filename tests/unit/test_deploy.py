"""The deployment files agree with the code: s.yaml (Serverless Devs 3, fc3), the Dockerfile and the Knative
manifest.

The `s` CLI cannot check s.yaml offline (it downloads the fc3 component first), so each function's props are
validated against the component's own JSON Schema (tests/data/fc3-props.schema.json), made strict here: a key
the schema does not know is an error, as a typo would silently do nothing on FC. Then the cross-checks:
every SDFUNC_* variable is a real setting and its value parses; ports, lifecycle and health paths are routes
of the app; the concurrency matches the queue; the timeouts cover the measured cold start and the queue; the
image installs with the README's install script and starts the command the end-to-end tests start.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from handler.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "tests" / "data" / "fc3-props.schema.json").read_text())
# Variables the function reads that are not sdfunc settings: none (hub access is turned off in code, pipelines.offline)
NON_SETTINGS_ENV: set[str] = set()
TEST_ACCOUNT = "1234567890123456"

_EXPR = re.compile(r"\$\{([^}]*)\}")


def _resolve(value: Any, variables: dict[str, Any]) -> Any:
    """Serverless Devs' `${...}` expressions as `s deploy` would see them on a machine without the optional
    environment: `env('X', 'd')` -> d, `env('X')` -> a stand-in, `config('AccountID')`, `vars.x`."""
    if isinstance(value, dict):
        return {k: _resolve(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        expr = match.group(1).strip()
        if m := re.fullmatch(r"env\('([A-Z0-9_]+)'(?:,\s*'([^']*)')?\)", expr):
            return m.group(2) if m.group(2) is not None else f"test-{m.group(1).lower().replace('_', '-')}"
        if expr == "config('AccountID')":
            return TEST_ACCOUNT
        if m := re.fullmatch(r"vars\.([a-z0-9_]+)", expr):
            return str(_resolve(variables[m.group(1)], variables))
        raise AssertionError(f"unknown expression in s.yaml: ${{{expr}}}")

    return _EXPR.sub(one, value)


@pytest.fixture(scope="module")
def s_yaml() -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "s.yaml").read_text())
    return {**raw, "resources": _resolve(raw["resources"], raw.get("vars", {}))}


@pytest.fixture(scope="module")
def functions(s_yaml) -> dict[str, dict[str, Any]]:
    found = {name: res["props"] for name, res in s_yaml["resources"].items() if res.get("component") == "fc3"}
    assert found, "s.yaml declares no fc3 function"
    return found


@pytest.fixture(scope="module")
def knative() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "knative" / "service.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return parser


@pytest.fixture(scope="module")
def routes(tmp_path_factory) -> set[tuple[str, str]]:
    """(method, path) of every route of the app the image runs."""
    from handler.app import create_app
    from tests.conftest import make_settings

    app = create_app(make_settings(tmp_path_factory.mktemp("deploy-data"), record_requests=False))
    try:
        return {(method, rule.rule) for rule in app.url_map.iter_rules() for method in rule.methods or ()}
    finally:
        app.extensions["sdfunc"].stop()


def strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever an object lists its properties and says nothing
    about others (not in `if` conditions: those list only the property they test)."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for key, child in node.items():
                if key != "if":
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(schema)
    return schema


def validate_props(props: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(strict(SCHEMA))
    errors = sorted(validator.iter_errors(props), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path)) or '<props>'}: {e.message}" for e in errors)


def setting_path_exists(name: str) -> bool:
    """`SDFUNC_A__B` names field `a.b` of the settings object (nested models), case-insensitive."""
    from pydantic import BaseModel

    model: type[BaseModel] = Settings
    parts = name.removeprefix("SDFUNC_").lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


def settings_from(env: dict[str, str], monkeypatch) -> Settings:
    for key in [k for k in os.environ if k.startswith("SDFUNC_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)


# s.yaml ---------------------------------------------------------------------------------------------------
def test_s_yaml_is_serverless_devs_3_with_fc3_functions(s_yaml, functions):
    assert str(s_yaml["edition"]) == "3.0.0"
    assert "${" not in str(s_yaml["access"])  # s reads `access` as it is: an expression there breaks s deploy
    assert set(functions) == {"sdfunc-sd15", "sdfunc-sdxl"}
    for props in functions.values():
        assert props["runtime"] == "custom-container"


@pytest.mark.parametrize("name", ["sdfunc-sd15", "sdfunc-sdxl"])
def test_each_function_matches_the_fc3_schema_strictly(functions, name):
    validate_props(functions[name])


PARSER = ROOT / "deploy" / "serverless-devs"


def serverless_devs_parse(path: Path, home: Path) -> dict[str, Any]:
    """`path` resolved by Serverless Devs' own parser (deploy/serverless-devs/parse.js), with the stand-ins
    `_resolve` uses for the environment and an access alias holding TEST_ACCOUNT."""
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None or not (PARSER / "node_modules" / "@serverless-devs" / "parse-spec").is_dir():
        if os.environ.get("SDFUNC_REQUIRE_NODE") == "1":
            pytest.fail("SDFUNC_REQUIRE_NODE=1 but Node.js or deploy/serverless-devs/node_modules is missing "
                        "(scripts/test-services.sh installs it)")
        pytest.skip("Node.js or Serverless Devs' parser not installed (scripts/test-services.sh)")
    (home / ".s").mkdir(parents=True, exist_ok=True)
    (home / ".s" / "access.yaml").write_text(
        f"default:\n  AccountID: '{TEST_ACCOUNT}'\n  AccessKeyID: test\n  AccessKeySecret: test\n")
    names = set(re.findall(r"env\('([A-Z0-9_]+)'\)", path.read_text()))  # those without a default
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG")}
    env.update(HOME=str(home), **{n: f"test-{n.lower().replace('_', '-')}" for n in names})
    done = subprocess.run([node, str(PARSER / "parse.js"), str(path)], cwd=path.parent, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_serverless_devs_own_parser_reads_s_yaml_as_the_tests_do(functions, tmp_path):
    """The s CLI cannot validate offline, but its spec parser runs offline: it resolves s.yaml (anchors,
    variables, `access`) to the same props that the schema checks above validated."""
    parsed = serverless_devs_parse(ROOT / "s.yaml", tmp_path / "home")
    assert {name: step["component"] for name, step in parsed.items()} == {name: "fc3" for name in functions}
    for name, step in parsed.items():
        validate_props(step["props"])
        assert step["props"] == functions[name]


def test_the_strict_schema_catches_typos(functions):
    props = copy.deepcopy(functions["sdfunc-sd15"])
    props["gpuConfig"]["gpuMemorySise"] = 16384
    with pytest.raises(AssertionError, match="gpuMemorySise"):
        validate_props(props)
    props = copy.deepcopy(functions["sdfunc-sd15"])
    props["gpuConfig"]["gpuType"] = "fc.gpu.t4"
    with pytest.raises(AssertionError, match="gpuType"):
        validate_props(props)


def test_no_secret_is_written_in_s_yaml():
    text = (ROOT / "s.yaml").read_text()
    assert not re.search(r"LTAI[0-9A-Za-z]{12,}", text)  # an Alibaba Cloud AccessKey ID
    raw = yaml.safe_load(text)
    for res in raw["resources"].values():
        env = res["props"]["environmentVariables"]
        for key in ("SDFUNC_DATABASE_URL", "SDFUNC_AUTH__TOKENS"):
            assert key not in env or env[key].startswith("${env("), f"{key} must come from the environment"


@pytest.mark.parametrize("name", ["sdfunc-sd15", "sdfunc-sdxl"])
def test_every_variable_is_a_real_setting_and_parses(functions, name, monkeypatch):
    env = functions[name]["environmentVariables"]
    unknown = [k for k in env if k not in NON_SETTINGS_ENV and not (k.startswith("SDFUNC_") and setting_path_exists(k))]
    assert not unknown, f"not settings: {unknown}"
    settings = settings_from({k: v for k, v in env.items() if k.startswith("SDFUNC_")}, monkeypatch)
    assert str(settings.data_dir) == functions[name]["nasConfig"]["mountPoints"][0]["mountDir"]
    assert settings.auth.mode == "token" and settings.build_demo_models is False
    assert settings.warmup.on_start is False  # FC's initializer warms up instead
    assert settings.cache.copy_to_local is True


def test_port_lifecycle_and_health_paths_are_the_apps(functions, routes, monkeypatch):
    for props in functions.values():
        settings = settings_from({k: v for k, v in props["environmentVariables"].items() if k.startswith("SDFUNC_")},
                                 monkeypatch)
        assert props["customContainerConfig"]["port"] == settings.port == Settings.model_fields["port"].default
        hooks = props["instanceLifecycleConfig"]
        # FC runs the hooks as commands in the container; `sdfunc hook` calls the app's lifecycle routes.
        from handler.cli import HOOKS

        for hook, name in (("initializer", "initialize"), ("preStop", "pre-stop")):
            assert hooks[hook]["command"] == ["sdfunc", "hook", name]
            assert "handler" not in hooks[hook]  # fc3 refuses handler and command together
            assert HOOKS[name] in routes
        assert ("GET", props["customContainerConfig"]["healthCheckConfig"]["httpGetUrl"]) in routes


def _measured_cold_start_seconds() -> float:
    """The slowest `Popen -> /initialize done` in bench/RESULTS.md (the cold-start benchmark's latest run)."""
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    values = [float(m) for m in re.findall(r"\| initialize first \| [0-9.]+ s \([^)]*\) \| ([0-9.]+) s", text)]
    assert values, "bench/RESULTS.md has no cold-start figures"
    return max(values)


def test_timeouts_cover_the_cold_start_the_queue_and_the_drain(functions, monkeypatch):
    measured = _measured_cold_start_seconds()
    for props in functions.values():
        env = {k: v for k, v in props["environmentVariables"].items() if k.startswith("SDFUNC_")}
        settings = settings_from(env, monkeypatch)
        hooks = props["instanceLifecycleConfig"]
        # The measured cold start is the demo model on CPU; real checkpoints copied from NAS and loaded on a GPU
        # take tens of seconds (docs/deploy.md): ten times the measurement is the least we accept.
        assert hooks["initializer"]["timeout"] >= 10 * measured
        assert hooks["initializer"]["timeout"] <= props["timeout"]
        assert hooks["preStop"]["timeout"] > settings.prestop_grace_seconds
        assert props["timeout"] >= settings.queue.timeout_seconds
        assert settings.timeout >= hooks["initializer"]["timeout"]  # gunicorn must not kill a cold load


def test_instance_concurrency_matches_the_queue(functions, knative, monkeypatch):
    for props in functions.values():
        env = {k: v for k, v in props["environmentVariables"].items() if k.startswith("SDFUNC_")}
        settings = settings_from(env, monkeypatch)
        # one running + the waiting ones: FC scales out instead of the function answering 429
        assert props["instanceConcurrency"] == settings.queue.max_waiting + 1
        assert settings.http_threads > props["instanceConcurrency"]
    spec = knative["Service"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value", "") for e in spec["containers"][0]["env"]}
    settings = settings_from({k: v for k, v in env.items() if k.startswith("SDFUNC_") and v}, monkeypatch)
    assert spec["containerConcurrency"] == settings.queue.max_waiting + 1


# Knative --------------------------------------------------------------------------------------------------
def test_knative_service_agrees_with_the_app(knative, routes, monkeypatch):
    assert knative["Service"]["apiVersion"] == "serving.knative.dev/v1"
    template = knative["Service"]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    for key in ("min-scale", "max-scale", "scale-to-zero-pod-retention-period", "target-utilization-percentage"):
        assert f"autoscaling.knative.dev/{key}" in annotations
    spec = template["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    unknown = [k for k in env if k not in NON_SETTINGS_ENV and not (k.startswith("SDFUNC_") and setting_path_exists(k))]
    assert not unknown, f"not settings: {unknown}"
    settings = settings_from({k: e["value"] for k, e in env.items() if k.startswith("SDFUNC_") and "value" in e},
                             monkeypatch)
    assert container["ports"][0]["containerPort"] == settings.port
    assert ("GET", container["readinessProbe"]["httpGet"]["path"]) in routes
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert ("GET", container["livenessProbe"]["httpGet"]["path"]) in routes
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "lifecycle" not in container  # Knative refuses container lifecycle hooks
    assert settings.warmup.on_start is True  # no initializer on Knative: warm at start, ready when warm
    assert settings.queue.timeout_seconds <= spec["timeoutSeconds"] <= 600  # Knative's default ceiling
    for secret in ("SDFUNC_DATABASE_URL", "SDFUNC_AUTH__TOKENS"):
        assert "secretKeyRef" in env[secret]["valueFrom"]
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == str(settings.data_dir)
    claim = spec["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert knative["PersistentVolumeClaim"]["metadata"]["name"] == claim


# the image -------------------------------------------------------------------------------------------------
def _instructions(parser: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == name]


def test_the_image_installs_with_the_readme_script_and_runs_what_the_tests_run(dockerfile, functions, knative):
    serve_sh = (ROOT / "scripts" / "serve.sh").read_text()
    assert 'EXTRAS="" . scripts/venv.sh' in serve_sh  # the README's first command installs with this
    runs = " ".join(_instructions(dockerfile, "RUN"))
    assert "EXTRAS=\"\" bash -euo pipefail -c '. scripts/venv.sh'" in runs  # ... and so does the image
    assert "pip install" not in runs  # no second, drifting install recipe
    cmd = json.loads(_instructions(dockerfile, "CMD")[-1])
    assert cmd == ["sdfunc", "serve"]
    assert "exec .venv/bin/sdfunc serve" in serve_sh  # what scripts/serve.sh starts
    assert 'sdfunc = "handler.cli:main"' in (ROOT / "pyproject.toml").read_text()
    served = (ROOT / "tests" / "support" / "serving.py").read_text()  # what the e2e tests start
    assert '[sys.executable, "-m", "handler.cli", "serve"' in served
    for props in functions.values():
        assert props["customContainerConfig"]["command"] == cmd
    assert knative["Service"]["spec"]["template"]["spec"]["containers"][0]["command"] == cmd


def test_the_image_is_lean_non_root_with_a_healthcheck(dockerfile, routes):
    assert _instructions(dockerfile, "USER")[-1] not in ("root", "0")
    assert _instructions(dockerfile, "EXPOSE") == [str(Settings.model_fields["port"].default)]
    health = _instructions(dockerfile, "HEALTHCHECK")[-1]
    path = re.search(r"http://127\.0\.0\.1:9000(/[a-z-]+)", health).group(1)
    assert ("GET", path) in routes
    copied = " ".join(_instructions(dockerfile, "COPY"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    for package in re.search(r"include = \[([^\]]*)\]", pyproject).group(1).replace('"', "").replace("*", "").split(","):
        assert f"{package.strip()}/" in copied, f"the image does not copy {package.strip()}/"
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data/", "tests/"} <= ignored
    args = dict(shlex.split(a.replace("=", " ", 1)) for a in _instructions(dockerfile, "ARG") if "=" in a)
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:12.")


# the guide ---------------------------------------------------------------------------------------------------
def _yaml_blocks(markdown: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", markdown, flags=re.S)


def test_the_guide_names_every_deploy_variable_and_its_snippets_are_valid(s_yaml, functions):
    guide = (ROOT / "docs" / "deploy.md").read_text()
    for name in sorted(set(re.findall(r"env\('([A-Z0-9_]+)'", (ROOT / "s.yaml").read_text()))):
        assert f"`{name}`" in guide, f"docs/deploy.md does not explain {name}"
    assert "cannot validate" in guide  # says why the tests use the schema instead of the s CLI
    blocks = [yaml.safe_load(b) for b in _yaml_blocks(guide)]
    snippets = [b for b in blocks if isinstance(b, dict) and ("ossMountConfig" in b or "scalingConfig" in b)]
    assert snippets, "docs/deploy.md shows no ossMountConfig / scalingConfig snippet"
    raw_vars = yaml.safe_load((ROOT / "s.yaml").read_text())["vars"]
    for snippet in snippets:  # each replaces props of the SD 1.5 function and must still be valid
        props = copy.deepcopy(functions["sdfunc-sd15"])
        props.update(_resolve(snippet, raw_vars))
        if "ossMountConfig" in snippet:
            props.pop("nasConfig", None)
        validate_props(props)
