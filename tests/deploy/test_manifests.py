"""Deployment material (SPEC §11): the Dockerfile and deploy/kubernetes/.

The manifests are validated against the Kubernetes schemas that `kubernetes-validate` ships
(strict: unknown fields are errors), the kustomization is rendered the way `kubectl
kustomize` would for the features it uses, and the wiring is checked for meaning: patgate a
native sidecar running `serve`, probes on the admin listener, a shutdown that outlasts the
drain, a Service and NetworkPolicy that reach patgate only, and a ConfigMap that patgate's
own loader accepts. The Dockerfile is linted with hadolint and checked for its structure.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

from gateway.cli import DEFAULT_PID_FILE
from gateway.config import Config, load_config
from gateway.errors import ConfigError
from gateway.management.sessions import MIN_HS256_SECRET_BYTES, SessionVerifier
from gateway.routing import RouteTable
from gateway.server import SHUTDOWN_GRACE

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
KUSTOMIZATION = KUBERNETES / "kustomization.yaml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

# Native sidecars are on by default from 1.29, the preStop `sleep` action from 1.30: the
# manifests must validate there and against the newest schemas the package ships.
MIN_KUBERNETES = "1.30"
KUBERNETES_VERSIONS = (MIN_KUBERNETES, kubernetes_validate.latest_version())
ENDPOINT_PROPAGATION = 5  # seconds for a deleted pod to drop out of every load balancer
SHUTDOWN_MARGIN = 5  # seconds for the app's own exit after its preStop
APP_CONTAINER = "app"
PATGATE_CONTAINER = "patgate"
PLACEHOLDER = "CHANGE-ME"
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")

Manifest = dict[str, Any]


# Loading and rendering -------------------------------------------------------------------


def read_documents(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.glob("*.yaml") if p != KUSTOMIZATION)


def kustomization() -> Manifest:
    data = yaml.safe_load(KUSTOMIZATION.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


# What the renderer below understands; anything else in kustomization.yaml would be
# silently dropped by it, so its presence fails the tests instead.
KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "labels", "namespace"}


def render() -> list[Manifest]:
    """kubectl kustomize, for the features kustomization.yaml uses: resources (local files),
    namespace, and labels (pairs; includeSelectors/includeTemplates)."""
    spec = kustomization()
    unsupported = set(spec) - KUSTOMIZE_KEYS
    assert not unsupported, f"the test renderer does not implement {sorted(unsupported)}"
    assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert spec["kind"] == "Kustomization"
    rendered: list[Manifest] = []
    for name in spec["resources"]:
        path = KUBERNETES / name
        assert path.is_file(), f"kustomization.yaml lists {name}, which does not exist"
        for doc in read_documents(path):  # fresh objects on every call
            if "namespace" in spec:
                doc["metadata"]["namespace"] = spec["namespace"]
            for group in spec.get("labels", []):
                pairs = group["pairs"]
                doc["metadata"].setdefault("labels", {}).update(pairs)
                template = doc.get("spec", {}).get("template")
                if template is not None and (
                    group.get("includeTemplates") or group.get("includeSelectors")
                ):
                    template.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
                if group.get("includeSelectors"):
                    for selector in _selectors(doc):
                        selector.update(pairs)
            rendered.append(doc)
    return rendered


def _selectors(doc: Manifest) -> Iterator[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "Service":
        yield spec.setdefault("selector", {})
    elif "selector" in spec:
        yield spec["selector"].setdefault("matchLabels", {})
    elif doc["kind"] == "NetworkPolicy":
        yield spec["podSelector"].setdefault("matchLabels", {})


def one(kind: str, name: str | None = None) -> Manifest:
    found = [
        doc for doc in render() if doc["kind"] == kind and name in (None, doc["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(kind: str) -> Manifest:
    spec: Manifest = one(kind)["spec"]["template"]["spec"]
    return spec


def container(spec: Manifest, name: str, *, init: bool = False) -> Manifest:
    group: list[Manifest] = spec.get("initContainers" if init else "containers", [])
    found = [c for c in group if c["name"] == name]
    assert len(found) == 1, f"no {'init ' if init else ''}container named {name}"
    return found[0]


def patgate() -> Manifest:
    return container(pod_spec("Deployment"), PATGATE_CONTAINER, init=True)


def app() -> Manifest:
    return container(pod_spec("Deployment"), APP_CONTAINER)


def port_number(owner: Manifest, port: int | str) -> int:
    """A probe's or a Service's port (a number, or the name of one of owner's ports)."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in owner.get("ports", []) if p.get("name") == port]
    assert numbers, f"container {owner['name']} has no port named {port}"
    return int(numbers[0])


def secret_env() -> dict[str, str]:
    data: dict[str, str] = one("Secret", "patgate-secrets")["stringData"]
    return data


def gateway_yaml() -> str:
    text: str = one("ConfigMap", "patgate-config")["data"]["gateway.yaml"]
    return text


@pytest.fixture
def cluster_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """The ConfigMap's gateway.yaml as patgate loads it in the pod, with the Secret's values
    (a real-length session key in place of the placeholder)."""
    for name in ("PATGATE_CONFIG", "PATGATE_PORT", "PATGATE_ADMIN_PORT", "PATGATE_UPSTREAM"):
        monkeypatch.delenv(name, raising=False)
    for name, value in secret_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATGATE_SESSION_SECRET", "k" * MIN_HS256_SECRET_BYTES)
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(), encoding="utf-8")
    return load_config(path)


# Schemas ---------------------------------------------------------------------------------


def test_the_schemas_cover_native_sidecars() -> None:
    assert Version(kubernetes_validate.latest_version()) >= Version(MIN_KUBERNETES)
    assert Version(MIN_KUBERNETES) >= Version("1.29")  # restartPolicy on init containers


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path: Path, version: str) -> None:
    documents = read_documents(path)
    assert documents, f"{path.name} holds no manifest"
    for doc in documents:
        validated = kubernetes_validate.validate(doc, version, strict=True)
        assert Version(validated) == Version(version)  # that version's own schemas


def test_strict_validation_catches_a_misspelt_field() -> None:
    """The check above means something: a field the schema lacks is an error."""
    deployment = copy.deepcopy(read_documents(KUBERNETES / "deployment.yaml")[0])
    sidecar = deployment["spec"]["template"]["spec"]["initContainers"][0]
    sidecar["restartPolicyy"] = sidecar.pop("restartPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


# The kustomization -----------------------------------------------------------------------


def test_kustomization_lists_every_manifest_once() -> None:
    resources = kustomization()["resources"]
    assert len(resources) == len(set(resources))
    assert sorted(resources) == [p.name for p in manifest_files()]


def test_kustomization_renders_unique_valid_objects() -> None:
    rendered = render()
    keys = [(doc["kind"], doc["metadata"]["name"]) for doc in rendered]
    assert len(keys) == len(set(keys)), f"duplicate kind/name: {keys}"
    assert {kind for kind, _ in keys} >= {
        "ConfigMap",
        "Secret",
        "Job",
        "Deployment",
        "Service",
        "NetworkPolicy",
    }
    for group in kustomization().get("labels", []):
        for doc in rendered:
            assert group["pairs"].items() <= doc["metadata"]["labels"].items()
    for doc in rendered:  # the labels kustomize adds must keep every object valid
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_selectors_select_the_app_pods() -> None:
    pod_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    deployment_selector = one("Deployment")["spec"]["selector"]["matchLabels"]
    selectors = [
        deployment_selector,
        one("Service")["spec"]["selector"],
        one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector
        assert selector.items() <= pod_labels.items()
    job_labels = one("Job")["spec"]["template"]["metadata"]["labels"]
    assert not deployment_selector.items() <= job_labels.items()  # migrations get no traffic


# patgate as a native sidecar -------------------------------------------------------------


def test_patgate_is_a_native_sidecar_running_serve() -> None:
    spec = pod_spec("Deployment")
    sidecar = patgate()
    assert sidecar["restartPolicy"] == "Always"
    assert PATGATE_CONTAINER not in [c["name"] for c in spec["containers"]]
    assert "command" not in sidecar  # the image's ENTRYPOINT (patgate) runs ...
    assert dockerfile_final_stage().exec_form("ENTRYPOINT") == ["patgate"]
    assert sidecar["args"] == ["serve"]  # ... as `patgate serve`
    assert "--migrate" not in sidecar["args"]  # the Job migrates
    assert sidecar["image"] == one("Job")["spec"]["template"]["spec"]["containers"][0]["image"]


def test_sidecar_probes_hit_the_admin_listener(cluster_config: Config) -> None:
    sidecar = patgate()
    admin = cluster_config.admin_listen
    assert admin.host == "0.0.0.0"  # the kubelet probes the pod IP, not 127.0.0.1
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe, path in expected.items():
        http_get = sidecar[probe]["httpGet"]
        assert http_get["path"] == path, probe
        assert port_number(sidecar, http_get["port"]) == admin.port, probe
    assert admin.port != cluster_config.listen.port


def test_shutdown_outlasts_the_drain() -> None:
    """The kubelet stops the app before its sidecar, so the app's preStop keeps it answering
    while the pod leaves the endpoints and patgate finishes what it accepted (SPEC §11: 20 s);
    the grace period then leaves patgate its own full drain after SIGTERM."""
    pre_stop = app()["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod_spec("Deployment")["terminationGracePeriodSeconds"]
    assert pre_stop >= ENDPOINT_PROPAGATION + SHUTDOWN_GRACE
    sidecar_pre_stop = patgate().get("lifecycle", {}).get("preStop", {}).get("sleep", {})
    sidecar_delay = sidecar_pre_stop.get("seconds", 0)  # runs only after the app has exited
    assert grace >= pre_stop + sidecar_delay + SHUTDOWN_GRACE + SHUTDOWN_MARGIN


def test_patgate_reload_finds_a_writable_pid_file() -> None:
    """`kubectl exec ... -c patgate -- patgate reload` reads the pid file `serve` wrote: its
    default path, relative to the image's WORKDIR, must be on a writable volume, since the
    root filesystem is read-only."""
    workdir = Path(dockerfile_final_stage().args_of("WORKDIR")[-1])
    pid_file = workdir / DEFAULT_PID_FILE
    sidecar = patgate()
    assert "PATGATE_PID_FILE" not in {e["name"] for e in sidecar.get("env", [])}
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {v["name"] for v in pod_spec("Deployment")["volumes"] if "emptyDir" in v}
    assert any(
        pid_file.is_relative_to(mount["mountPath"]) and mount["name"] in writable
        for mount in sidecar["volumeMounts"]
    ), pid_file


def test_rollouts_keep_a_ready_replica() -> None:
    deployment = one("Deployment")["spec"]
    assert deployment["replicas"] >= 2
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


# Reaching the app only through patgate ---------------------------------------------------


def app_address() -> tuple[str, int]:
    args = dict(arg.removeprefix("--").split("=", 1) for arg in app()["args"])
    return args["host"], int(args["port"])


def test_app_listens_on_loopback_only(cluster_config: Config) -> None:
    host, port = app_address()
    assert host == "127.0.0.1"
    assert "ports" not in app()  # nothing of the app's is declared to the pod network
    assert cluster_config.routes
    for route in cluster_config.routes:
        assert route.upstream == f"http://127.0.0.1:{port}", route.name


def test_app_readiness_goes_through_a_public_route(cluster_config: Config) -> None:
    probe = app()["readinessProbe"]["httpGet"]
    assert port_number(patgate(), probe["port"]) == cluster_config.listen.port
    table = RouteTable(cluster_config.routes)
    route = table.match(None, "GET", probe["path"])
    assert route.public
    _, port = app_address()
    assert table.upstream_url(route, probe["path"], "") == f"http://127.0.0.1:{port}/healthz"


def test_service_targets_patgate_only(cluster_config: Config) -> None:
    ports = one("Service")["spec"]["ports"]
    assert len(ports) == 1
    target = port_number(patgate(), ports[0]["targetPort"])
    assert target == cluster_config.listen.port
    assert target not in (app_address()[1], cluster_config.admin_listen.port)


def test_network_policy_admits_patgate_and_monitoring_only(cluster_config: Config) -> None:
    policy = one("NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    allowed: dict[int, list[Any]] = {}
    for rule in policy["ingress"]:
        assert rule.get("ports"), "a rule without ports would open every port"
        for port in rule["ports"]:
            allowed.setdefault(port_number(patgate(), port["port"]), []).append(rule.get("from"))
    assert set(allowed) == {cluster_config.listen.port, cluster_config.admin_listen.port}
    assert allowed[cluster_config.listen.port] == [None]  # the proxy: from anywhere
    [admin_from] = allowed[cluster_config.admin_listen.port]
    assert admin_from == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


# Configuration and secrets ---------------------------------------------------------------


def test_configmap_is_a_config_patgate_accepts(cluster_config: Config) -> None:
    assert cluster_config.database.url == secret_env()["PATGATE_DATABASE_URL"]
    assert cluster_config.listen.port == 8080
    assert cluster_config.management.sessions.hs256_secret == "k" * MIN_HS256_SECRET_BYTES
    assert SessionVerifier(cluster_config.management.sessions).enabled


def test_configmap_refuses_to_run_without_the_database_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No silent fallback to the embedded development database inside a cluster."""
    monkeypatch.delenv("PATGATE_DATABASE_URL", raising=False)
    monkeypatch.setenv("PATGATE_SESSION_SECRET", "k" * MIN_HS256_SECRET_BYTES)
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert any("PATGATE_DATABASE_URL is not set" in error for error in caught.value.errors)


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_config_is_mounted_where_the_image_looks(kind: str) -> None:
    spec = pod_spec(kind)
    gateway = patgate() if kind == "Deployment" else container(spec, "migrate")
    config_path = Path(dockerfile_final_stage().env()["PATGATE_CONFIG"])
    assert config_path == Path("/etc/patgate/gateway.yaml")
    env = {e["name"]: e["value"] for e in gateway.get("env", [])}
    assert Path(env.get("PATGATE_CONFIG", str(config_path))) == config_path
    [mount] = [m for m in gateway["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    assert mount["readOnly"] is True
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "patgate-config"
    assert config_path.name in one("ConfigMap", "patgate-config")["data"]
    variables = set(VARIABLE.findall(gateway_yaml()))
    secrets = {ref["secretRef"]["name"] for ref in gateway["envFrom"]}
    assert secrets == {"patgate-secrets"}
    assert variables <= set(secret_env()) | set(env), "every ${VAR} has a value in the pod"


def test_example_secret_is_a_placeholder_that_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = secret_env()
    assert set(secret) == {"PATGATE_DATABASE_URL", "PATGATE_SESSION_SECRET"}
    assert all(PLACEHOLDER in value for value in secret.values())
    assert "EXAMPLE" in (KUBERNETES / "secret.yaml").read_text(encoding="utf-8")
    for name, value in secret.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(), encoding="utf-8")
    sessions = load_config(path).management.sessions
    with pytest.raises(ConfigError, match="hs256_secret"):  # patgate will not start with it
        SessionVerifier(sessions)


def test_migration_job_runs_migrate() -> None:
    job = one("Job", "patgate-migrate")["spec"]
    migrate = container(job["template"]["spec"], "migrate")
    assert "command" not in migrate
    assert migrate["args"] == ["migrate"]
    assert migrate["image"] == patgate()["image"]
    assert job["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    assert job["backoffLimit"] >= 1  # PostgreSQL may come up after the Job


# Security --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_every_container_is_locked_down(kind: str) -> None:
    spec = pod_spec(kind)
    pod = spec["securityContext"]
    assert spec["automountServiceAccountToken"] is False
    items = spec.get("initContainers", []) + spec["containers"]
    assert len(items) == (2 if kind == "Deployment" else 1)
    for item in items:
        own, where = item["securityContext"], f"{kind}/{item['name']}"
        assert own.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
        assert own.get("seccompProfile", pod.get("seccompProfile")) == {"type": "RuntimeDefault"}, (
            where
        )
        assert own["allowPrivilegeEscalation"] is False, where
        assert own["readOnlyRootFilesystem"] is True, where
        assert own["capabilities"]["drop"] == ["ALL"], where
        assert not own["capabilities"].get("add"), where
        assert own.get("privileged") is not True, where
        resources = item["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), where
        assert {"cpu", "memory"} <= set(resources["limits"]), where


def test_pods_run_as_the_image_user() -> None:
    uid, gid = dockerfile_final_stage().user()
    for kind in ("Deployment", "Job"):
        pod = pod_spec(kind)["securityContext"]
        assert (pod["runAsUser"], pod["runAsGroup"]) == (uid, gid), kind


# The Dockerfile --------------------------------------------------------------------------


def hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: it is a test dependency (pip install -e '.[test]')")
    return found


def lint(dockerfile: Path, tmp_path: Path) -> list[dict[str, Any]]:
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n", encoding="utf-8")  # no ambient config mutes a rule
    result = subprocess.run(
        [
            hadolint(),
            "--config",
            str(config),
            "--disable-ignore-pragma",
            "--format",
            "json",
            "--failure-threshold",
            "style",
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings: list[dict[str, Any]] = json.loads(result.stdout or "[]")
    assert (result.returncode == 0) == (not findings), result.stderr
    return findings


def test_hadolint_passes_on_the_dockerfile(tmp_path: Path) -> None:
    findings = lint(DOCKERFILE, tmp_path)
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter runs and speaks: unpinned base and apt packages are flagged."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install gcc\n", encoding="utf-8")
    codes = {finding["code"] for finding in lint(bad, tmp_path)}
    assert {"DL3007", "DL3008"} <= codes


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]]

    def args_of(self, keyword: str) -> list[str]:
        return [args for instruction, args in self.instructions if instruction == keyword]

    def exec_form(self, keyword: str) -> list[str]:
        found = self.args_of(keyword)
        assert len(found) == 1, f"expected one {keyword}"
        value: list[str] = json.loads(found[0])
        return value

    def env(self) -> dict[str, str]:
        pairs = [item.split("=", 1) for args in self.args_of("ENV") for item in shlex.split(args)]
        return {key: value for key, value in pairs}

    def user(self) -> tuple[int, int]:
        users = self.args_of("USER")
        assert users, "the final stage sets no USER"
        match = re.fullmatch(r"(\d+):(\d+)", users[-1])
        assert match, f"USER {users[-1]} is not a numeric uid:gid"
        return int(match[1]), int(match[2])


def dockerfile_stages() -> list[Stage]:
    stages: list[Stage] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending, keyword, args = "", keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name, []))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def dockerfile_final_stage() -> Stage:
    return dockerfile_stages()[-1]


def test_dockerfile_is_multi_stage_on_a_pinned_slim_base() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert build.name == "build"
    assert final.name is None
    for stage in (build, final):
        image, _, tag = stage.base.partition(":")
        assert image == "python", stage.base
        assert re.fullmatch(r"3\.11(\.\d+)?-slim(-\w+)?", tag), stage.base
    assert any("from=build" in args for _, args in final.instructions)


def test_final_stage_installs_wheels_only_without_compilers() -> None:
    final = dockerfile_final_stage()
    runs = " ".join(final.args_of("RUN"))
    installs = re.findall(r"pip install [^&;]*", runs)
    assert installs, "the final stage installs nothing"
    assert all("--no-index" in command for command in installs)
    forbidden = r"\b(gcc|g\+\+|clang|make|build-essential|python3-dev|apt-get|apk)\b"
    assert not re.search(forbidden, runs), runs
    copied = [args.split()[0] for args in final.args_of("COPY")]
    assert not {"gateway", "pyproject.toml", "."} & set(copied)  # no source tree


def test_final_stage_runs_patgate_serve_as_a_numeric_non_root_user() -> None:
    final = dockerfile_final_stage()
    uid, gid = final.user()
    assert uid != 0
    assert gid != 0
    last_user = max(i for i, (keyword, _) in enumerate(final.instructions) if keyword == "USER")
    assert all(keyword != "RUN" for keyword, _ in final.instructions[last_user:])
    assert final.exec_form("ENTRYPOINT") + final.exec_form("CMD") == ["patgate", "serve"]
    env = final.env()
    assert env["PATGATE_CONFIG"] == "/etc/patgate/gateway.yaml"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert any(args.split()[-1] == env["PATGATE_CONFIG"] for args in final.args_of("COPY"))


def test_final_stage_exposes_both_listeners_and_checks_health(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("PATGATE_PORT", "PATGATE_ADMIN_PORT"):
        monkeypatch.delenv(name, raising=False)
    final = dockerfile_final_stage()
    default = load_config(REPO / "config" / "gateway.yaml")  # the config the image ships
    exposed = {int(port) for args in final.args_of("EXPOSE") for port in args.split()}
    assert exposed == {default.listen.port, default.admin_listen.port}
    [healthcheck] = final.args_of("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert "--interval=" in options
    assert "--timeout=" in options
    probe = " ".join(json.loads(command))
    assert "/healthz" in probe
    assert str(default.admin_listen.port) in probe  # the admin listener, inside the container


# The build context -----------------------------------------------------------------------


def _pattern(text: str) -> re.Pattern[str]:
    out, i = "", 0
    text = text.strip("/")
    while i < len(text):
        if text.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif text.startswith("**", i):
            out, i = out + ".*", i + 2
        elif text[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif text[i] == "?":
            out, i = out + "[^/]", i + 1
        elif text[i] == "[":
            end = text.index("]", i)
            out, i = out + text[i : end + 1], end + 1
        else:
            out, i = out + re.escape(text[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negated, pattern in rules:
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _pattern(line.removeprefix("!"))))
    return rules


def test_dockerignore_keeps_what_the_build_copies() -> None:
    rules = dockerignore_rules()
    copied = [
        source
        for stage in dockerfile_stages()
        for args in stage.args_of("COPY")
        if not args.startswith("--from")
        for source in args.split()[:-1]
    ]
    assert copied
    files: list[str] = []
    for source in copied:
        path = REPO / source
        if path.is_dir():
            files += [
                str(f.relative_to(REPO))
                for f in path.rglob("*")
                if f.is_file() and "__pycache__" not in f.parts
            ]
        else:
            files.append(source)
    assert "gateway/migrations/001_init.sql" in files
    assert [f for f in files if dockerignored(f, rules)] == []


def test_dockerignore_leaves_out_local_state() -> None:
    rules = dockerignore_rules()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        ".patgate/pgdata/PG_VERSION",
        ".pytest_cache/README.md",
        ".hypothesis/examples/x",
        "tests/conftest.py",
        "deploy/kubernetes/secret.yaml",
        "gateway/__pycache__/app.cpython-311.pyc",
        "patgate.egg-info/PKG-INFO",
    ):
        assert dockerignored(path, rules), path
