"""The deployment files agree with the code: services, probes, GPU requests, the scaler's queue,
and every GRADLEAK_ variable names a real field of service.settings.Settings."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILES = {"api": DEPLOY / "Dockerfile.api", "worker": DEPLOY / "Dockerfile.worker"}

SETTINGS_VARS = frozenset(f"GRADLEAK_{name.upper()}" for name in Settings.model_fields)
ENV_NAME = re.compile(r"\bGRADLEAK_[A-Z0-9_]*[A-Z0-9]\b")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?([-?])([^}]*))?\}")


@pytest.fixture(autouse=True)
def no_gradleak_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings built here see only what the deploy files say, not this machine's environment."""
    for name in list(os.environ):
        if name.startswith("GRADLEAK_"):
            monkeypatch.delenv(name)


# ---- loading -------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def compose() -> dict[str, Any]:
    (doc,) = load_docs(COMPOSE)
    return doc


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def k8s_docs() -> list[dict[str, Any]]:
    """The Kubernetes objects (kustomization.yaml is kustomize's index, not an object)."""
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in load_docs(p)]


def k8s_one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def deployment(component: str) -> dict[str, Any]:
    found = [
        d
        for d in k8s_docs()
        if d["kind"] == "Deployment"
        and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {component} Deployment, found {len(found)}"
    return found[0]


def container(dep: dict[str, Any]) -> dict[str, Any]:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def config_data() -> dict[str, str]:
    return k8s_one("ConfigMap")["data"]


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    return {**secret.get("data", {}), **secret.get("stringData", {})}


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name} ends inside a continued line"
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def env_keys(args: str) -> list[str]:
    tokens = shlex.split(args)
    if "=" not in tokens[0]:
        return [tokens[0]]  # legacy `ENV NAME value`
    return [t.split("=", 1)[0] for t in tokens]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def interpolate(value: str) -> str:
    """Compose's ${NAME:-default} and ${NAME:?message}, with a stand-in for required values."""
    return INTERPOLATION.sub(lambda m: m[3] if m[2] == "-" else f"required-{m[1].lower()}", value)


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def settings_from(env: dict[str, str]) -> Settings:
    values = {k.removeprefix("GRADLEAK_").lower(): v for k, v in env.items() if k.startswith("GRADLEAK_")}
    return Settings.model_validate(values)


def seconds(duration: str) -> float:
    """Compose durations such as 1h5m30s."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and any(parts.groups()), f"unsupported duration {duration!r}"
    h, m, s = (int(g or 0) for g in parts.groups())
    return h * 3600.0 + m * 60.0 + s


# ---- every GRADLEAK_ variable is a setting ---------------------------------------------------------


def structured_env_names() -> set[str]:
    names: set[str] = set()
    doc = compose()
    for service in doc["services"].values():
        names |= set(compose_env(service))
    names |= {m[1] for m in INTERPOLATION.finditer(COMPOSE.read_text())}
    for d in k8s_docs():
        if d["kind"] == "ConfigMap":
            names |= set(d["data"])
        elif d["kind"] == "Secret":
            names |= set(secret_data(d))
        elif d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                names |= {e["name"] for e in c.get("env", [])}
    for path in DOCKERFILES.values():
        for keyword, args in dockerfile(path):
            if keyword == "ENV":
                names |= set(env_keys(args))
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            names.add(line.split("=", 1)[0].strip())
    return {n for n in names if n.startswith("GRADLEAK_")}


def test_structured_env_names_are_settings_fields() -> None:
    names = structured_env_names()
    # The collector must see the variables the deployment cannot work without.
    assert {
        "GRADLEAK_REDIS_URL",
        "GRADLEAK_S3_ENDPOINT",
        "GRADLEAK_S3_SECRET_KEY",
        "GRADLEAK_DATA_DIR",
    } <= names
    assert sorted(names - SETTINGS_VARS) == []


@pytest.mark.parametrize("path", sorted(p for p in DEPLOY.rglob("*") if p.is_file()), ids=lambda p: p.name)
def test_every_mention_in_deploy_is_a_settings_field(path: Path) -> None:
    unknown = sorted(set(ENV_NAME.findall(path.read_text())) - SETTINGS_VARS)
    assert unknown == [], f"{path.relative_to(ROOT)} names variables Settings does not have: {unknown}"


def test_settings_accept_the_deployed_values() -> None:
    settings = settings_from(config_data())
    assert settings.s3_endpoint and settings.redis_url and settings.auth_required is True
    for name in ("api", "worker"):
        env = {k: interpolate(v) for k, v in compose_env(services()[name]).items()}
        assert settings_from(env).redis_url == "redis://redis:6379/0"


# ---- YAML --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses_into_mappings(path: Path) -> None:
    docs = load_docs(path)
    assert docs
    assert all(isinstance(d, dict) for d in docs)


# ---- docker compose --------------------------------------------------------------------------------


def test_compose_services_and_healthchecks() -> None:
    svc = services()
    assert {"api", "worker", "redis", "minio", "minio-init"} <= set(svc)
    assert svc["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert svc["minio"]["healthcheck"]["test"]
    assert svc["minio"]["command"][:2] == ["server", "/data"]
    assert "--console-address" in svc["minio"]["command"]
    assert svc["minio-init"]["image"].startswith("minio/mc")
    assert svc["minio-init"]["restart"] == "no"


@pytest.mark.parametrize("name", ["api", "worker"])
def test_compose_app_waits_for_healthy_dependencies(name: str) -> None:
    depends = services()[name]["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["minio"]["condition"] == "service_healthy"
    assert depends["minio-init"]["condition"] == "service_completed_successfully"
    assert services()["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["api", "worker"])
def test_compose_builds_from_the_deploy_dockerfiles(name: str) -> None:
    build = services()[name]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILES[name]


def test_compose_worker_reserves_one_nvidia_gpu() -> None:
    (device,) = services()["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert device["capabilities"] == ["gpu"]


def test_compose_worker_grace_covers_a_job() -> None:
    worker = services()["worker"]
    limit = settings_from({k: interpolate(v) for k, v in compose_env(worker).items()}).max_time_limit_s
    assert seconds(worker["stop_grace_period"]) >= limit


def test_compose_secrets_come_from_the_env_file() -> None:
    required = re.compile(r"^\$\{[A-Z0-9_]+:\?[^}]+\}$")
    checked = 0
    for name, service in services().items():
        for key, value in compose_env(service).items():
            if any(word in key for word in ("SECRET", "PASSWORD", "ACCESS_KEY")):
                assert required.match(value), f"{name}: {key} must be ${{VAR:?message}}, not {value!r}"
                checked += 1
    assert checked >= 4


def test_env_example_leaves_secrets_empty() -> None:
    pairs = dict(
        line.split("=", 1)
        for line in (DEPLOY / ".env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert pairs["MINIO_ROOT_PASSWORD"] == "" and pairs["GRADLEAK_S3_SECRET_KEY"] == ""
    needed = {m[1] for m in INTERPOLATION.finditer(COMPOSE.read_text()) if m[2] == "?"}
    assert needed <= set(pairs)


# ---- Kubernetes --------------------------------------------------------------------------------------


def test_k8s_kinds() -> None:
    kinds = Counter(d["kind"] for d in k8s_docs())
    assert kinds["Deployment"] == 2
    assert kinds["Service"] == 1
    assert kinds["ScaledObject"] == 1
    assert kinds["Secret"] == 1
    assert kinds["ConfigMap"] == 1


def test_k8s_manifests_are_namespace_agnostic() -> None:
    assert [d["metadata"]["name"] for d in k8s_docs() if "namespace" in d["metadata"]] == []


@pytest.mark.parametrize("component", ["api", "worker"])
def test_k8s_env_comes_from_the_configmap_and_secret(component: str) -> None:
    refs = container(deployment(component))["envFrom"]
    assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} == {
        k8s_one("ConfigMap")["metadata"]["name"]
    }
    assert {r["secretRef"]["name"] for r in refs if "secretRef" in r} == {
        k8s_one("Secret")["metadata"]["name"]
    }


@pytest.mark.parametrize("component", ["api", "worker"])
def test_k8s_pods_run_as_non_root(component: str) -> None:
    spec = deployment(component)["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert container(deployment(component))["securityContext"]["allowPrivilegeEscalation"] is False


def test_k8s_api_deployment() -> None:
    dep = deployment("api")
    assert dep["spec"]["replicas"] == 2
    c = container(dep)
    port_names = {p["name"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {c["readinessProbe"]["httpGet"]["port"], c["livenessProbe"]["httpGet"]["port"]} <= port_names
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]


def test_k8s_service_routes_to_the_api_pods() -> None:
    service, dep = k8s_one("Service"), deployment("api")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in container(dep)["ports"]}


def test_k8s_worker_requests_a_gpu_and_waits_for_its_job() -> None:
    dep = deployment("worker")
    assert container(dep)["resources"]["limits"]["nvidia.com/gpu"] == 1
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 3600
    assert grace >= settings_from(config_data()).max_time_limit_s


def test_k8s_scaledobject_watches_the_arq_queue() -> None:
    scaled = k8s_one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment("worker")["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    # KEDA's redis scaler counts a sorted set (arq's queue) with ZCARD.
    assert trigger["type"] == "redis"
    settings = settings_from(config_data())
    assert trigger["metadata"]["listName"] == settings.queue_name
    assert settings.redis_url is not None
    url = urlsplit(settings.redis_url)
    assert trigger["metadata"]["address"] == f"{url.hostname}:{url.port or 6379}"
    assert trigger["metadata"]["databaseIndex"] == (url.path.strip("/") or "0")
    assert int(trigger["metadata"]["listLength"]) >= 1


def test_k8s_configmap_and_secret_values_are_strings() -> None:
    assert all(isinstance(v, str) for v in config_data().values())
    secret = k8s_one("Secret")
    assert all(isinstance(v, str) for v in secret_data(secret).values())
    for component in ("api", "worker"):
        assert all(isinstance(e["value"], str) for e in container(deployment(component)).get("env", []))


def test_k8s_secret_is_a_template_with_the_s3_keys() -> None:
    data = secret_data(k8s_one("Secret"))
    assert {"GRADLEAK_S3_ACCESS_KEY", "GRADLEAK_S3_SECRET_KEY"} <= set(data)
    assert all("REPLACE_ME" in v for v in data.values())


def test_kustomization_lists_the_manifests_but_not_the_secret_template() -> None:
    (kustomization,) = load_docs(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert all((K8S / r).is_file() for r in listed)
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.template.yaml"}


# ---- Dockerfiles ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "subcommand"), [("api", "serve"), ("worker", "worker")])
def test_dockerfile_basics(name: str, subcommand: str) -> None:
    instructions = dockerfile(DOCKERFILES[name])
    assert any(k == "FROM" for k, _ in instructions)
    stage = final_stage(instructions)
    users = [args for k, args in stage if k == "USER"]
    assert users, f"Dockerfile.{name} runs as root: no USER in its final stage"
    assert users[-1].split(":")[0] not in ("root", "0")
    (cmd,) = [exec_form(args) for k, args in stage if k == "CMD"]
    assert cmd[:2] == ["gradleak", subcommand]


def test_api_dockerfile_healthcheck_and_cpu_torch() -> None:
    instructions = dockerfile(DOCKERFILES["api"])
    (health,) = [args for k, args in final_stage(instructions) if k == "HEALTHCHECK"]
    assert "/healthz" in health
    exec_form(health.split("CMD", 1)[1].strip())
    (cmd,) = [exec_form(args) for k, args in final_stage(instructions) if k == "CMD"]
    assert cmd == ["gradleak", "serve", "--host", "0.0.0.0"]
    assert any("download.pytorch.org/whl/cpu" in args for k, args in instructions if k == "RUN")


def test_worker_dockerfile_uses_a_cuda_pytorch_base() -> None:
    args = dict(a.split("=", 1) for k, a in dockerfile(DOCKERFILES["worker"]) if k == "ARG" and "=" in a)
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn9-runtime", args["TORCH_IMAGE"])
    pinned = re.search(r"^torch==([\d.]+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pinned is not None
    assert args["TORCH_IMAGE"].startswith(f"pytorch/pytorch:{pinned[1]}-")


@pytest.mark.parametrize("name", ["api", "worker"])
def test_dockerfile_copies_what_the_package_build_needs(name: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = {"pyproject.toml", "constraints.txt", project["project"]["readme"], *packages}
    copied = {
        src.rstrip("/")
        for k, args in dockerfile(DOCKERFILES[name])
        if k == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    }
    assert needed <= copied


def test_the_cli_has_the_subcommands_the_images_run() -> None:
    from service.cli import app

    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    if importlib.util.find_spec("service.cli_service") is None:
        pytest.skip("service.cli_service (serve, worker) is not written yet")
    assert {"serve", "worker"} <= commands


def test_the_api_port_agrees_everywhere_and_is_not_flowers() -> None:
    """One port in the settings, the SDK's default URL, the image and the manifests; not 8000,
    which Flower's SuperLink takes by default on the same machine."""
    from gradleak_client._base import DEFAULT_URL

    port = Settings().port
    assert port != 8000 and urlsplit(DEFAULT_URL).port == port
    dockerfile = DOCKERFILES["api"].read_text()
    assert f"GRADLEAK_PORT={port}" in dockerfile and f"EXPOSE {port}" in dockerfile
    assert f":{port}" in services()["api"]["ports"][0]
    assert {p["containerPort"] for p in container(deployment("api"))["ports"]} == {port}


def test_worker_image_fetches_the_lpips_weights_where_the_metric_looks() -> None:
    """Built once into the image (verified by `gradleak assets fetch`), before the unprivileged
    user takes over, in the folder the worker's settings point the metric at."""
    steps = dockerfile(DOCKERFILES["worker"])
    runs = [args for keyword, args in steps if keyword == "RUN"]
    fetch = runs.index("gradleak assets fetch lpips")
    install = next(i for i, args in enumerate(runs) if args.startswith("pip install"))
    assert install < fetch
    user = next(i for i, (keyword, _) in enumerate(steps) if keyword == "USER")
    assert steps.index(("RUN", "gradleak assets fetch lpips")) < user
    env = " ".join(args for keyword, args in steps if keyword == "ENV")
    assert "GRADLEAK_LPIPS_WEIGHTS_DIR=/opt/gradleak/weights" in env.split()
