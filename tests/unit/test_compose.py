"""docker-compose.yml and the service Dockerfiles agree with the code they package.

Nothing here builds or starts a container: the file is parsed and checked against what the
services declare (their SETTINGS, the console scripts in pyproject.toml), so a renamed flag,
a moved Dockerfile or a URL pointing at the wrong port fails here instead of at `up`.
"""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from cairn import config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PYPROJECT = ROOT / "pyproject.toml"

INFRA = ("nats", "redis", "minio", "jaeger")
CAIRN = ("cairn-meta", "cairn-nodeplugin")
# What each infrastructure image listens on inside the network (its defaults).
IMAGE_PORTS = {
    "nats": {4222, 8222},
    "redis": {6379},
    "minio/minio": {9000, 9001},
    "jaegertracing/all-in-one": {4317, 4318, 16686},
}
# Images that have no shell or HTTP client to run a health check with.
NO_HEALTHCHECK_POSSIBLE = {"jaegertracing/all-in-one"}
# Variables a Cairn service may carry besides its own CAIRN_* settings.
STANDARD_ENV = re.compile(r"^AWS_[A-Z_]+$")
# Which setting must reach which service, and on which port.
URL_TARGETS = {
    "CAIRN_NATS_URL": ("nats", 4222),
    "CAIRN_META_URL": ("redis", 6379),
    "CAIRN_STORAGE_URL": ("minio", 9000),
    "CAIRN_OTLP_ENDPOINT": ("jaeger", 4317),
}
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


@cache
def scripts() -> dict[str, str]:
    """Console scripts of pyproject.toml: name -> 'module:function'."""
    return tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]


def settings_of_script(script: str) -> tuple[config.Setting, ...]:
    module = importlib.import_module(scripts()[script].partition(":")[0])
    return tuple(module.SETTINGS)


def interpolate(value: str) -> str:
    """The value as compose would see it with no variables set (defaults applied)."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value).replace("$$", "$")


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: interpolate(str(value)) for key, value in env.items()}


def dockerfile_path(service: dict) -> Path:
    build = service["build"]
    if isinstance(build, str):
        build = {"context": build}
    return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def dockerfile_lines(path: Path) -> list[str]:
    """Instructions of a Dockerfile: comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def instructions(path: Path, keyword: str) -> list[str]:
    prefix = keyword.upper() + " "
    return [
        line[len(prefix) :].strip()
        for line in dockerfile_lines(path)
        if line.upper().startswith(prefix)
    ]


def entrypoint(path: Path) -> list[str]:
    found = instructions(path, "ENTRYPOINT")
    assert len(found) == 1, f"{path}: one ENTRYPOINT expected, found {found}"
    assert found[0].startswith("["), (
        f"{path}: ENTRYPOINT must use the exec form (signals reach the process)"
    )
    return yaml.safe_load(found[0])


def final_stage(path: Path) -> list[str]:
    """The instructions of the last build stage (what the image runs with)."""
    lines = dockerfile_lines(path)
    start = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    return lines[start:]


def service_dockerfiles() -> list[Path]:
    return sorted(ROOT.glob("services/*/Dockerfile"))


def cairn_services() -> dict[str, dict]:
    """Compose services built from a Cairn Dockerfile."""
    return {name: svc for name, svc in services().items() if "build" in svc}


def script_of(service: dict) -> str:
    return entrypoint(dockerfile_path(service))[0]


def image_name(image: str) -> str:
    """The repository of an image reference (no tag or digest)."""
    name = image.split("@")[0]
    return name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name


def listening_ports(name: str) -> set[int]:
    """Ports a service listens on: its image's defaults, `expose`, and CAIRN_*_ADDR settings."""
    svc = services()[name]
    ports = set(IMAGE_PORTS.get(image_name(svc.get("image", "")), set()))
    ports |= {int(str(p).split("/")[0]) for p in svc.get("expose", [])}
    for key, value in environment(svc).items():
        if key.startswith("CAIRN_") and key.endswith("_ADDR") and value:
            ports.add(int(value.rpartition(":")[2]))
    return ports


def published(service: dict) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of each published port."""
    result = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            result.append(
                (entry.get("host_ip", "0.0.0.0"), int(entry["published"]), int(entry["target"]))
            )
            continue
        parts = str(entry).split("/")[0].split(":")
        if len(parts) == 1:
            continue  # container port only: docker picks a free host port
        ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        result.append((ip, int(parts[-2]), int(parts[-1])))
    return result


def url_host_port(value: str) -> tuple[str, int | None]:
    """Host and port a URL connects to; for s3:// the `endpoint` query parameter's."""
    parts = urlsplit(value)
    if parts.scheme == "s3":
        endpoints = parse_qs(parts.query).get("endpoint")
        assert endpoints, f"s3 URL '{value}' names no endpoint: it would go to AWS"
        parts = urlsplit(endpoints[0])
    return parts.hostname, parts.port


# ------------------------------------------------------------------ structure


def test_top_level_structure():
    data = compose()
    assert isinstance(data.get("services"), dict) and data["services"]
    assert isinstance(data.get("volumes"), dict)
    for name in INFRA + CAIRN:
        assert name in data["services"], f"service {name} missing from docker-compose.yml"


def test_every_service_has_an_image_or_a_build_that_exists():
    for name, svc in services().items():
        assert "image" in svc or "build" in svc, f"{name}: neither image nor build"
        if "build" in svc:
            context = ROOT / (
                svc["build"].get("context", ".") if isinstance(svc["build"], dict) else svc["build"]
            )
            assert context.is_dir(), f"{name}: build context {context} does not exist"
            assert dockerfile_path(svc).is_file(), f"{name}: {dockerfile_path(svc)} does not exist"


def test_built_images_are_named_after_their_service_and_version():
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    for name, svc in cairn_services().items():
        service_dir = dockerfile_path(svc).parent.name
        assert svc.get("image") == f"cairn-{service_dir}:{version}", name


def test_named_volumes_are_declared_and_used():
    declared = set(compose()["volumes"])
    used = set()
    for name, svc in services().items():
        for volume in svc.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else str(volume).split(":")[0]
            if source.startswith((".", "/", "~")):
                continue  # a bind mount
            assert source in declared, f"{name}: volume {source} is not declared at the top level"
            used.add(source)
    assert declared == used, f"declared but unused volumes: {declared - used}"


def test_stateful_infrastructure_keeps_its_data_in_named_volumes():
    for name, path in (("nats", "/data"), ("redis", "/data"), ("minio", "/data")):
        mounts = [str(v).split(":") for v in services()[name].get("volumes", [])]
        assert any(m[1] == path for m in mounts if len(m) > 1), f"{name}: {path} is not a volume"


def test_nats_runs_jetstream_on_its_volume():
    command = services()["nats"]["command"]
    args = command if isinstance(command, list) else shlex.split(command)
    assert "-js" in args or "--jetstream" in args
    store = args[args.index("-sd") + 1] if "-sd" in args else args[args.index("--store_dir") + 1]
    assert any(str(v).split(":")[1] == store for v in services()["nats"]["volumes"])


def test_redis_appends_every_write():
    command = services()["redis"]["command"]
    args = command if isinstance(command, list) else shlex.split(command)
    assert args[args.index("--appendonly") + 1] == "yes"


def test_jaeger_accepts_otlp():
    assert environment(services()["jaeger"]).get("COLLECTOR_OTLP_ENABLED") == "true"
    assert any(target == 16686 for _, _, target in published(services()["jaeger"]))


def test_every_service_runs_except_the_kubernetes_controllers():
    # The controllers watch PVCs, VolumeAttachments and Datasets and exit when there is no
    # API server; deploy/ runs them. Every other service belongs in the local stack.
    controllers = {"cairn-provisioner", "cairn-attacher", "cairn-cache-syncer", "cairn-dataset-webhook"}
    for script in scripts():
        if script == "cairn":
            continue
        assert (script in services()) is (script not in controllers), script
    for name, svc in cairn_services().items():
        assert script_of(svc) == name, f"compose service {name} runs {script_of(svc)}"


# ------------------------------------------------------------------ environment


@pytest.mark.parametrize("name", CAIRN)
def test_cairn_environment_is_what_the_service_understands(name):
    svc = services()[name]
    settings = settings_of_script(script_of(svc))
    known = {s.env: s for s in settings}
    for key, value in environment(svc).items():
        if key.startswith(config.ENV_PREFIX):
            assert key in known, f"{name}: {key} is not a setting of {script_of(svc)}"
            config.check_url(known[key], value)  # raises ConfigError on a malformed URL
        else:
            assert STANDARD_ENV.match(key), f"{name}: {key} is neither CAIRN_* nor AWS_*"


def test_urls_point_at_services_and_ports_that_exist():
    checked = set()
    for name in CAIRN:
        for key, value in environment(services()[name]).items():
            if "://" not in value or value.startswith("unix://"):
                continue
            host, port = url_host_port(value)
            assert host in services(), f"{name}: {key}={value}: no service named {host}"
            assert port in listening_ports(host), (
                f"{name}: {key}={value}: {host} does not listen on {port}"
            )
            if key in URL_TARGETS:
                assert (host, port) == URL_TARGETS[key], f"{name}: {key}={value}"
                checked.add(key)
    assert checked == set(URL_TARGETS), f"never set: {set(URL_TARGETS) - checked}"


def test_s3_credentials_are_minio_credentials():
    minio = environment(services()["minio"])
    meta = environment(services()["cairn-meta"])
    assert meta["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert meta["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    assert len(minio["MINIO_ROOT_PASSWORD"]) >= 8, "MinIO refuses passwords under 8 characters"


def test_images_carry_the_s3_client_when_the_stack_uses_s3():
    # cairn.storage.s3 imports boto3 lazily, so a missing client shows only at start-up.
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    if any(re.match(r"boto3\b", dep) for dep in dependencies):
        return
    for name, svc in cairn_services().items():
        if environment(svc).get("CAIRN_STORAGE_URL", "").startswith("s3://"):
            installs = [line for line in final_stage(dockerfile_path(svc)) if "pip install" in line]
            assert any("boto3" in line for line in installs), f"{name}: image has no boto3"


def test_the_bucket_is_created_before_meta_starts():
    bucket = urlsplit(environment(services()["cairn-meta"])["CAIRN_STORAGE_URL"]).hostname
    init = services()["minio-init"]
    command = " ".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    assert f"local/{bucket}" in command
    condition = services()["cairn-meta"]["depends_on"]["minio-init"]["condition"]
    assert condition == "service_completed_successfully"


def test_csi_sockets_do_not_collide_on_shared_volumes():
    sockets: dict[tuple[str, str], str] = {}
    for name in CAIRN:
        svc = services()[name]
        path = urlsplit(environment(svc)["CAIRN_CSI_ENDPOINT"]).path
        mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in svc.get("volumes", [])}
        directory = str(Path(path).parent)
        assert directory in mounts, f"{name}: socket {path} is not on a volume"
        key = (mounts[directory], Path(path).name)
        assert key not in sockets, f"{name} and {sockets.get(key)} both use {key}"
        sockets[key] = name


def test_nodeplugin_can_mount_fuse():
    node = services()["cairn-nodeplugin"]
    assert node.get("privileged") is True
    assert any(str(d).split(":")[0] == "/dev/fuse" for d in node.get("devices", []))
    assert "SYS_ADMIN" in node.get("cap_add", [])
    assert environment(node).get("CAIRN_NODE_ID"), "the node plugin needs a node id"


# ------------------------------------------------------------------ ports and health


def test_published_ports_do_not_collide():
    seen: dict[int, str] = {}
    for name, svc in services().items():
        for _, host_port, _ in published(svc):
            assert host_port not in seen, f"host port {host_port}: {name} and {seen.get(host_port)}"
            seen[host_port] = name


def test_published_ports_are_ports_the_service_listens_on():
    for name, svc in services().items():
        for _, _, target in published(svc):
            assert target in listening_ports(name), (
                f"{name} publishes {target} but does not listen there"
            )


def test_infrastructure_and_cairn_services_have_healthchecks():
    for name in INFRA + CAIRN:
        svc = services()[name]
        if image_name(svc.get("image", "")) in NO_HEALTHCHECK_POSSIBLE:
            assert "healthcheck" not in svc, f"{name}: its image cannot run a health check"
            continue
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no health check"


def test_depends_on_conditions_can_be_met():
    for name, svc in services().items():
        depends = svc.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on should say which condition"
        for other, spec in depends.items():
            assert other in services(), f"{name} depends on unknown {other}"
            condition = spec.get("condition", "service_started")
            if condition == "service_healthy":
                assert "healthcheck" in services()[other], f"{name} waits for {other}'s health"
            if condition == "service_completed_successfully":
                assert str(services()[other].get("restart", "no")) == "no", other


def test_cairn_healthchecks_probe_the_service_configuration():
    meta = services()["cairn-meta"]
    test = meta["healthcheck"]["test"]
    assert test[1:3] == ["cairn", "probe"]
    assert test[test.index("--csi-endpoint") + 1] == environment(meta)["CAIRN_CSI_ENDPOINT"]
    node = services()["cairn-nodeplugin"]
    port = environment(node)["CAIRN_HEALTH_ADDR"].rpartition(":")[2]
    assert f":{port}/healthz" in " ".join(node["healthcheck"]["test"])


# ------------------------------------------------------------------ Dockerfiles


def test_every_service_package_has_a_dockerfile():
    packages = sorted(p.parent.parent.name for p in ROOT.glob("services/*/cairn_*/__init__.py"))
    assert packages, "no service packages found"
    for directory in packages:
        assert (ROOT / "services" / directory / "Dockerfile").is_file(), directory


@pytest.mark.parametrize("path", service_dockerfiles(), ids=lambda p: p.parent.name)
def test_dockerfile_entrypoint_is_the_service_console_script(path):
    script = entrypoint(path)[0]
    assert script in scripts(), f"{path}: ENTRYPOINT {script} is not in [project.scripts]"
    assert script == f"cairn-{path.parent.name}"
    package = scripts()[script].partition(".")[0]
    assert (path.parent / package).is_dir(), f"{script} runs {package}, not this folder's package"


@pytest.mark.parametrize("path", service_dockerfiles(), ids=lambda p: p.parent.name)
def test_dockerfile_builds_the_project(path):
    froms = [line.split()[0] for line in instructions(path, "FROM")]
    assert all(image.startswith("python:3.11-slim") for image in froms), froms
    text = " ".join(dockerfile_lines(path))
    assert "cairn.rpc.codegen" in text, f"{path}: the gRPC code is never generated"
    assert re.search(r"pip (install|wheel) [^&]*\.(\s|$)", text), (
        f"{path}: the project is never installed"
    )
    for copied in ("pyproject.toml", "proto/", "libs/", "services/"):
        assert copied in " ".join(instructions(path, "COPY")), f"{path}: {copied} not copied"


@pytest.mark.parametrize("path", service_dockerfiles(), ids=lambda p: p.parent.name)
def test_dockerfile_user_and_environment(path):
    script = entrypoint(path)[0]
    users = [line for line in final_stage(path) if line.upper().startswith("USER ")]
    if path.parent.name == "nodeplugin":
        assert not users, "the node plugin mounts file systems: it runs as root"
    else:
        assert users and users[-1].split()[1].split(":")[0] not in ("0", "root"), (
            f"{path}: runs as root"
        )
    known = {s.env for s in settings_of_script(script)}
    for line in instructions(path, "ENV"):
        for key in re.findall(r"\b(CAIRN_\w+)=", line):
            assert key in known, f"{path}: ENV {key} is not a setting of {script}"


def test_nodeplugin_image_has_fuse_and_mount_tools():
    text = " ".join(dockerfile_lines(ROOT / "services/nodeplugin/Dockerfile"))
    for package in ("fuse3", "libfuse3-dev", "pkg-config", "gcc", "util-linux", "mount"):
        assert re.search(rf"apt-get install[^&]*\b{re.escape(package)}\b", text), package


def test_dockerignore_keeps_out_local_state_but_not_the_sources():
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for local in (".git", ".venv", "libs/cairn/rpc/gen"):
        assert local in ignored, f".dockerignore should leave out {local}"
    for path in service_dockerfiles():
        for copy in instructions(path, "COPY"):
            if copy.startswith("--from"):
                continue
            for source in copy.split()[:-1]:
                assert source.rstrip("/") not in ignored, (
                    f"{path} copies {source}, which is ignored"
                )
