"""deploy/: the Kubernetes manifests are well formed and agree with the code they run.

No cluster is needed: every manifest is parsed and checked against what the services declare
(their SETTINGS and flags, the `cairn` CLI's commands, the Dockerfiles that build their images)
and against each other (service accounts, roles, secrets, volumes, probes, CRDs).
"""

from __future__ import annotations

import argparse
import importlib
import re
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

import cairn
from cairn import config
from cairn.service import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PYPROJECT = ROOT / "pyproject.toml"
NAMESPACE = "cairn-system"
EXAMPLE_SECRET = "secret-example.yaml"
CLUSTER_SCOPED = {
    "Namespace",
    "CSIDriver",
    "StorageClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "MutatingWebhookConfiguration",
}
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet"}
STANDARD_ENV = re.compile(r"^AWS_[A-Z_]+$")


# ------------------------------------------------------------------ loading


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


@cache
def documents(path: Path) -> tuple[dict, ...]:
    return tuple(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)


def objects() -> Iterator[tuple[Path, dict]]:
    for path in manifest_files():
        for doc in documents(path):
            yield path, doc


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in objects() if doc.get("kind") == kind]


def named(kind: str, name: str) -> dict:
    found = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads() -> list[dict]:
    return [doc for _, doc in objects() if doc.get("kind") in WORKLOADS]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers() -> Iterator[tuple[dict, dict]]:
    """(workload, container) for every container and init container."""
    for workload in workloads():
        spec = pod_spec(workload)
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield workload, container


def container(workload_name: str, container_name: str) -> dict:
    for workload, c in containers():
        if workload["metadata"]["name"] == workload_name and c["name"] == container_name:
            return c
    raise AssertionError(f"no container {container_name} in {workload_name}")


# ------------------------------------------------------------------ what the code declares


@cache
def project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def entrypoint(dockerfile: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    found = [
        line.strip()[len("ENTRYPOINT") :]
        for line in text.splitlines()
        if line.strip().upper().startswith("ENTRYPOINT ")
    ]
    assert len(found) == 1, f"{dockerfile}: one ENTRYPOINT expected"
    return yaml.safe_load(found[0])


@cache
def images() -> dict[str, str]:
    """Image repository -> the console script it runs, from services/*/Dockerfile."""
    return {
        f"cairn-{path.parent.name}": entrypoint(path)[0]
        for path in sorted(ROOT.glob("services/*/Dockerfile"))
    }


def settings_of(script: str) -> tuple[config.Setting, ...]:
    module = importlib.import_module(project()["scripts"][script].partition(":")[0])
    return tuple(module.SETTINGS)


def cli_parser() -> argparse.ArgumentParser:
    """The `cairn` CLI's parser; command modules still being written are left out."""
    from cairn.cli import main

    parser = argparse.ArgumentParser(prog="cairn", exit_on_error=False)
    sub = parser.add_subparsers(dest="command")
    for name in main.COMMAND_MODULES:
        try:
            module = importlib.import_module(f"cairn.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"cairn.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def subcommand_parser(command: str) -> argparse.ArgumentParser:
    choices = next(a for a in cli_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert command in choices.choices, f"`cairn {command}` is not a command of the cairn CLI"
    return choices.choices[command]


def known_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def flags_in(argv: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def image_repo(image: str) -> tuple[str, str]:
    name, _, tag = image.rpartition(":")
    return name, tag


def program(c: dict) -> tuple[str, list[str]]:
    """The console script a container runs and the arguments it gets."""
    argv = list(c.get("command", [])) + list(c.get("args", []))
    if "command" not in c:
        argv = [images()[image_repo(c["image"])[0]]] + argv
    return argv[0], argv[1:]


def container_arguments(workload: str, name: str) -> list[str]:
    return program(container(workload, name))[1]


# ------------------------------------------------------------------ every object


def test_every_object_has_api_version_kind_and_name():
    assert manifest_files(), "deploy/ has no manifests"
    for path, doc in objects():
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: {doc}"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} without a name"


def without_nulls(value):
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def test_objects_use_only_fields_kubernetes_knows():
    # The official client's models keep only the fields the API defines, so a misspelt or
    # misplaced field (mountPropogation, a probe under the wrong key) makes the round trip
    # through the model differ from the file. Stands in for server-side validation.
    from kubernetes.client import ApiClient

    api = ApiClient()
    for path, doc in objects():
        model = doc["apiVersion"].rpartition("/")[2].capitalize() + doc["kind"]
        # the generated client's deserializer by model name; stable across client versions
        obj = api._ApiClient__deserialize(doc, model)
        back = without_nulls(api.sanitize_for_serialization(obj))
        assert back == without_nulls(doc), f"{path.name}: {doc['kind']} {doc['metadata']['name']}"


def test_namespaced_objects_live_in_the_cairn_namespace():
    assert named("Namespace", NAMESPACE)
    for path, doc in objects():
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in CLUSTER_SCOPED:
            assert namespace is None, f"{path.name}: {doc['kind']} is cluster-scoped"
        else:
            assert namespace == NAMESPACE, f"{path.name}: {doc['kind']} {doc['metadata']['name']}"


def test_names_are_unique_per_kind_and_namespace():
    seen = set()
    for path, doc in objects():
        key = (
            doc["apiVersion"],
            doc["kind"],
            doc["metadata"].get("namespace"),
            doc["metadata"]["name"],
        )
        assert key not in seen, f"{path.name}: {key} defined twice"
        seen.add(key)


def test_kustomization_lists_every_manifest_but_the_example_secret():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization.get("namespace") == NAMESPACE
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    for resource in resources:
        assert (DEPLOY / resource).is_file(), f"kustomization lists missing {resource}"
    expected = {p.name for p in manifest_files()} - {EXAMPLE_SECRET}
    assert set(resources) == expected
    assert resources.index("namespace.yaml") == 0, "the namespace comes before what lives in it"


def test_readme_describes_every_file():
    readme = (DEPLOY / "README.md").read_text()
    for path in manifest_files() + [DEPLOY / "kustomization.yaml"]:
        assert path.name in readme, f"deploy/README.md does not mention {path.name}"


# ------------------------------------------------------------------ CSI driver and classes


def test_csidriver():
    driver = named("CSIDriver", cairn.DRIVER_NAME)["spec"]
    assert driver["attachRequired"] is False
    assert driver["podInfoOnMount"] is True
    assert driver["volumeLifecycleModes"] == ["Persistent"]
    assert driver["fsGroupPolicy"] == "File"


def test_storage_classes():
    shared = named("StorageClass", "cairn-shared")
    local = named("StorageClass", "cairn-local")
    for sc in (shared, local):
        assert sc["provisioner"] == cairn.DRIVER_NAME
        assert sc.get("reclaimPolicy", "Delete") in ("Delete", "Retain")
    assert shared["volumeBindingMode"] == "Immediate"
    assert shared["allowVolumeExpansion"] is True
    assert local["volumeBindingMode"] == "WaitForFirstConsumer"
    assert local["parameters"]["type"] == "local"


# ------------------------------------------------------------------ workloads


def test_workloads_have_matching_selectors():
    for workload in workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        for key, value in workload["spec"]["selector"]["matchLabels"].items():
            assert labels.get(key) == value, workload["metadata"]["name"]


def test_images_are_the_service_images_at_the_project_version():
    # one image per service, named after the console script it runs
    assert all(image == script for image, script in images().items()), images()
    scripts = {script for script in project()["scripts"] if script != "cairn"}
    assert set(images()) <= scripts
    # other console scripts run from a service's image, named by the container's command
    commanded = {program(c)[0] for _, c in containers() if "command" in c}
    assert scripts - set(images()) <= commanded, "a console script no manifest runs"
    used = set()
    for workload, c in containers():
        name, tag = image_repo(c["image"])
        assert name in images(), (
            f"{workload['metadata']['name']}/{c['name']}: unknown image {c['image']}"
        )
        assert tag == project()["version"], f"{c['name']}: image tag {tag}"
        used.add(name)
    assert used == set(images()), f"images built but never deployed: {set(images()) - used}"


def test_every_flag_is_one_the_program_defines():
    for workload, c in containers():
        where = f"{workload['metadata']['name']}/{c['name']}"
        script, argv = program(c)
        assert script in project()["scripts"], f"{where}: {script} is not a console script"
        if script == "cairn":
            parser = subcommand_parser(argv[0])
            argv = argv[1:]
        else:
            settings = settings_of(script)
            parser = build_parser(script, "", settings)
        known = known_flags(parser)
        for flag in flags_in(argv):
            assert flag in known, f"{where}: {script} has no flag {flag}"
        try:
            parsed = parser.parse_args(argv)
        except (SystemExit, argparse.ArgumentError) as error:
            raise AssertionError(f"{where}: {script} rejects {argv}: {error}") from None
        if script != "cairn":
            config.resolve(parsed, settings)  # URL and number forms; raises ConfigError


def test_every_cairn_variable_is_a_setting_of_the_program():
    for workload, c in containers():
        where = f"{workload['metadata']['name']}/{c['name']}"
        script, _ = program(c)
        known = {s.env for s in settings_of(script)} if script != "cairn" else set()
        for env in c.get("env", []):
            if env["name"].startswith(config.ENV_PREFIX):
                assert env["name"] in known, f"{where}: {env['name']} is not a setting of {script}"
            else:
                assert STANDARD_ENV.match(env["name"]), (
                    f"{where}: unexpected variable {env['name']}"
                )


def test_secret_references_exist_in_the_example_secret():
    secret = named("Secret", "cairn-config")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for _, c in containers():
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "cairn-config", f"{c['name']}: unknown secret {ref['name']}"
                assert ref["key"] in keys, (
                    f"{c['name']}: secret cairn-config has no key {ref['key']}"
                )


def test_mounts_name_pod_volumes_and_probes_name_ports():
    for workload in workloads():
        spec = pod_spec(workload)
        volumes = {v["name"] for v in spec.get("volumes", [])}
        ports = {}
        for c in spec["containers"]:
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{c['name']}: no volume {mount['name']}"
            for port in c.get("ports", []):
                assert port.get("name") not in ports, f"port name {port.get('name')} used twice"
                ports[port.get("name")] = port["containerPort"]
        for c in spec["containers"]:
            probe = c.get("livenessProbe", {}).get("httpGet")
            if probe and isinstance(probe["port"], str):
                assert probe["port"] in ports, f"{c['name']}: probe port {probe['port']} undeclared"


def test_listening_addresses_are_declared_ports():
    for workload in workloads():
        declared = {
            p["containerPort"] for c in pod_spec(workload)["containers"] for p in c.get("ports", [])
        }
        listening = []
        for c in pod_spec(workload)["containers"]:
            _, argv = program(c)
            for flag in ("--admin-addr", "--metrics-addr", "--health-addr", "--webhook-addr"):
                value = flag_value(argv, flag)
                if value:
                    host, _, port = value.rpartition(":")
                    assert host == "0.0.0.0", (
                        f"{c['name']}: {flag}={value} is unreachable from kubelet"
                    )
                    listening.append(int(port))
        assert len(listening) == len(set(listening)), (
            f"{workload['metadata']['name']}: two listeners share a port"
        )
        assert set(listening) <= declared, f"{workload['metadata']['name']}: undeclared ports"


def test_service_accounts_exist_in_rbac():
    accounts = {
        (sa["metadata"]["namespace"], sa["metadata"]["name"])
        for sa in documents(DEPLOY / "rbac.yaml")
        if sa["kind"] == "ServiceAccount"
    }
    for workload in workloads():
        account = pod_spec(workload).get("serviceAccountName")
        assert account, f"{workload['metadata']['name']} runs as the default service account"
        assert (workload["metadata"]["namespace"], account) in accounts, account


def test_bindings_reference_existing_roles_and_accounts():
    accounts = {
        (sa["metadata"]["namespace"], sa["metadata"]["name"]) for sa in of_kind("ServiceAccount")
    }
    for binding_kind, role_kinds in (
        ("ClusterRoleBinding", ("ClusterRole",)),
        ("RoleBinding", ("Role", "ClusterRole")),
    ):
        for binding in of_kind(binding_kind):
            ref = binding["roleRef"]
            assert ref["kind"] in role_kinds and ref["apiGroup"] == "rbac.authorization.k8s.io"
            named(ref["kind"], ref["name"])
            for subject in binding["subjects"]:
                assert subject["kind"] == "ServiceAccount"
                assert (subject["namespace"], subject["name"]) in accounts, subject


def grants(account: str) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) the service account may use, cluster-wide or namespaced."""
    result = set()
    for binding_kind in ("ClusterRoleBinding", "RoleBinding"):
        for binding in of_kind(binding_kind):
            if not any(s["name"] == account for s in binding["subjects"]):
                continue
            role = named(binding["roleRef"]["kind"], binding["roleRef"]["name"])
            for rule in role["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        result |= {(group, resource, verb) for verb in rule["verbs"]}
    return result


CONTROLLER_NEEDS = [
    ("", "persistentvolumes", "create"),
    ("", "persistentvolumes", "delete"),
    ("", "persistentvolumes", "watch"),
    ("", "persistentvolumeclaims", "watch"),
    ("", "persistentvolumeclaims", "patch"),
    ("storage.k8s.io", "storageclasses", "get"),
    ("storage.k8s.io", "csinodes", "get"),
    ("", "nodes", "get"),
    ("", "events", "create"),
    ("storage.k8s.io", "volumeattachments", "watch"),
    ("storage.k8s.io", "volumeattachments", "patch"),
    ("storage.k8s.io", "volumeattachments/status", "patch"),
    ("coordination.k8s.io", "leases", "update"),
    ("storage.k8s.io", "csistoragecapacities", "create"),
]


@pytest.mark.parametrize("group, resource, verb", CONTROLLER_NEEDS)
def test_controller_rbac(group, resource, verb):
    assert (group, resource, verb) in grants("cairn-controller")


def test_cache_syncer_rbac_covers_its_crds_and_node_labels():
    allowed = grants("cairn-cache-syncer")
    for crd in of_kind("CustomResourceDefinition"):
        group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
        for verb in ("get", "list", "watch", "update", "patch"):
            assert (group, plural, verb) in allowed, (plural, verb)
        assert (group, f"{plural}/status", "update") in allowed, plural
    assert ("", "nodes", "patch") in allowed
    assert ("coordination.k8s.io", "leases", "update") in allowed


def test_node_plugin_rbac_is_small():
    allowed = grants("cairn-node")
    assert ("", "nodes", "get") in allowed
    assert not any(verb in ("delete", "deletecollection", "*") for _, _, verb in allowed)


# ------------------------------------------------------------------ the controller pod


def test_controller_runs_meta_provisioner_attacher_and_liveness():
    deployment = named("Deployment", "cairn-controller")
    scripts = [program(c)[0] for c in pod_spec(deployment)["containers"]]
    for script in ("cairn-meta", "cairn-provisioner", "cairn-attacher"):
        assert script in scripts
    liveness = container("cairn-controller", "liveness")
    assert program(liveness)[0] == "cairn" and program(liveness)[1][0] == "liveness"


def test_controller_containers_share_one_csi_socket():
    spec = pod_spec(named("Deployment", "cairn-controller"))
    endpoints = set()
    for c in spec["containers"]:
        endpoint = flag_value(program(c)[1], "--csi-endpoint")
        if endpoint is None:
            continue
        endpoints.add(endpoint)
        socket_dir = str(Path(urlsplit(endpoint).path).parent)
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert socket_dir in mounts, f"{c['name']}: {socket_dir} is not a volume"
        volume = next(v for v in spec["volumes"] if v["name"] == mounts[socket_dir])
        assert "emptyDir" in volume
    assert len(endpoints) == 1, endpoints


def test_controller_liveness_probes_the_health_server():
    meta = container("cairn-controller", "cairn-meta")
    probe = meta["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    port = next(p["containerPort"] for p in meta["ports"] if p["name"] == probe["port"])
    served = flag_value(container_arguments("cairn-controller", "liveness"), "--health-addr")
    assert served.endswith(f":{port}")


def test_controller_containers_run_unprivileged():
    spec = pod_spec(named("Deployment", "cairn-controller"))
    assert spec["securityContext"]["runAsNonRoot"] is True
    for c in spec["containers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert not c["securityContext"].get("privileged")


# ------------------------------------------------------------------ the node DaemonSet


def node_volume(spec: dict, c: dict, mount_path: str) -> tuple[dict, dict]:
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == mount_path)
    return mount, next(v for v in spec["volumes"] if v["name"] == mount["name"])


def test_node_plugin_is_privileged_with_fuse():
    spec = pod_spec(named("DaemonSet", "cairn-node"))
    plugin = container("cairn-node", "cairn-nodeplugin")
    assert plugin["securityContext"]["privileged"] is True
    _, fuse = node_volume(spec, plugin, "/dev/fuse")
    assert fuse["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}


def test_node_plugin_mounts_kubelet_dir_bidirectionally():
    spec = pod_spec(named("DaemonSet", "cairn-node"))
    plugin = container("cairn-node", "cairn-nodeplugin")
    kubelet_dir = flag_value(program(plugin)[1], "--kubelet-dir") or config.KUBELET_DIR.default
    mount, volume = node_volume(spec, plugin, kubelet_dir)
    assert mount["mountPropagation"] == "Bidirectional"
    assert volume["hostPath"]["path"] == "/var/lib/kubelet"


def test_node_plugin_socket_and_registration_dirs():
    spec = pod_spec(named("DaemonSet", "cairn-node"))
    plugin = container("cairn-node", "cairn-nodeplugin")
    argv = program(plugin)[1]
    endpoint = urlsplit(flag_value(argv, "--csi-endpoint")).path
    _, plugin_dir = node_volume(spec, plugin, str(Path(endpoint).parent))
    assert plugin_dir["hostPath"]["path"] == f"/var/lib/kubelet/plugins/{cairn.DRIVER_NAME}"
    _, registration = node_volume(spec, plugin, flag_value(argv, "--registration-dir"))
    assert registration["hostPath"]["path"] == "/var/lib/kubelet/plugins_registry"


def test_node_plugin_liveness_and_node_id():
    plugin = container("cairn-node", "cairn-nodeplugin")
    probe = plugin["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    port = next(p["containerPort"] for p in plugin["ports"] if p["name"] == probe["port"])
    assert port == 9808
    assert flag_value(program(plugin)[1], "--health-addr") == f"0.0.0.0:{port}"
    node_id = next(e for e in plugin["env"] if e["name"] == config.NODE_ID.env)
    assert node_id["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_node_plugin_runs_on_every_node():
    spec = pod_spec(named("DaemonSet", "cairn-node"))
    assert {"operator": "Exists"} in spec.get("tolerations", [])


# ------------------------------------------------------------------ CRDs


def schema_errors(schema: dict, where: str) -> Iterator[str]:
    """Violations of the structural-schema rules apiextensions.k8s.io/v1 enforces."""
    special = schema.get("x-kubernetes-int-or-string") or schema.get(
        "x-kubernetes-preserve-unknown-fields"
    )
    if "type" not in schema and not special:
        yield f"{where}: no type"
    if "properties" in schema and schema.get("type") != "object":
        yield f"{where}: properties on a non-object"
    if schema.get("type") == "array" and "items" not in schema:
        yield f"{where}: array without items"
    for name in schema.get("required", []):
        if name not in schema.get("properties", {}):
            yield f"{where}: required {name} is not a property"
    for name, child in schema.get("properties", {}).items():
        yield from schema_errors(child, f"{where}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from schema_errors(schema["items"], f"{where}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from schema_errors(schema["additionalProperties"], f"{where}{{}}")


def schema_has_path(schema: dict, json_path: str) -> bool:
    node = schema
    for part in json_path.strip(".").split("."):
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return True
        if part not in node.get("properties", {}):
            return False
        node = node["properties"][part]
    return True


def crds() -> list[dict]:
    return of_kind("CustomResourceDefinition")


def test_crds_define_the_cache_resources():
    kinds = {crd["spec"]["names"]["kind"] for crd in crds()}
    assert kinds == {"Dataset", "CairnRuntime", "DataLoad"}


@pytest.mark.parametrize("kind", ["Dataset", "CairnRuntime", "DataLoad"])
def test_crd_is_structurally_valid(kind):
    crd = next(c for c in crds() if c["spec"]["names"]["kind"] == kind)
    spec = crd["spec"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert spec["group"] == "data.cairn.io"
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
    assert spec["scope"] in ("Namespaced", "Cluster")
    for field in ("plural", "singular", "kind", "listKind"):
        assert spec["names"].get(field), field
    assert spec["names"]["plural"] == spec["names"]["plural"].lower()
    versions = spec["versions"]
    assert "v1alpha1" in [v["name"] for v in versions]
    assert all(isinstance(v["served"], bool) and isinstance(v["storage"], bool) for v in versions)
    assert sum(v["storage"] for v in versions) == 1, "exactly one storage version"
    for version in versions:
        schema = version["schema"]["openAPIV3Schema"]
        assert schema["type"] == "object"
        assert {"spec", "status"} <= set(schema["properties"])
        assert "status" in version.get("subresources", {}), (
            f"{kind} {version['name']}: no status subresource"
        )
        assert list(schema_errors(schema, kind)) == []
        for column in version.get("additionalPrinterColumns", []):
            if column["jsonPath"].startswith(".metadata."):
                continue
            assert schema_has_path(schema, column["jsonPath"]), f"{kind}: column {column['name']}"


# ------------------------------------------------------------------ the dataset webhook


def webhook_configuration() -> dict:
    configuration = named("MutatingWebhookConfiguration", "cairn-dataset-webhook")
    assert len(configuration["webhooks"]) == 1
    return configuration["webhooks"][0]


def webhook_container() -> dict:
    return container("cairn-dataset-webhook", "cairn-dataset-webhook")


def test_webhook_sees_pod_creations_only_and_never_blocks_them():
    hook = webhook_configuration()
    assert hook["name"].endswith(".data.cairn.io")
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]  # fmt: skip
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert 1 <= hook["timeoutSeconds"] <= 10
    assert hook["reinvocationPolicy"] == "IfNeeded"
    # the lookups give up before the API server does, so the answer arrives in time
    from cairn_cache_syncer.webhook import LOOKUP_TIMEOUT

    timeout = flag_value(program(webhook_container())[1], LOOKUP_TIMEOUT.flag)
    assert float(timeout or LOOKUP_TIMEOUT.default) < hook["timeoutSeconds"]


def test_webhook_leaves_cairns_own_namespace_alone():
    selector = webhook_configuration()["namespaceSelector"]
    excluded = [
        e
        for e in selector["matchExpressions"]
        if e["key"] == "kubernetes.io/metadata.name" and e["operator"] == "NotIn"
    ]
    assert excluded and NAMESPACE in excluded[0]["values"]


def test_webhook_service_reaches_the_served_port_and_path():
    from cairn_cache_syncer.webhook import PATH

    client = webhook_configuration()["clientConfig"]
    assert "url" not in client
    ref = client["service"]
    assert ref["path"] == PATH
    service = named("Service", ref["name"])
    assert ref["namespace"] == service["metadata"]["namespace"] == NAMESPACE
    port = next(p for p in service["spec"]["ports"] if p["port"] == ref.get("port", 443))
    deployment = named("Deployment", "cairn-dataset-webhook")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    c = webhook_container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    target = (
        ports[port["targetPort"]] if isinstance(port["targetPort"], str) else port["targetPort"]
    )
    addr = flag_value(program(c)[1], "--webhook-addr")
    assert addr == f"0.0.0.0:{target}"
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"]["scheme"] == "HTTPS" and probe["httpGet"]["path"] == "/healthz"
        assert ports[probe["httpGet"]["port"]] == target


def test_webhook_certificate_comes_from_a_secret_volume():
    spec = pod_spec(named("Deployment", "cairn-dataset-webhook"))
    c = webhook_container()
    for flag in ("--tls-cert-file", "--tls-key-file"):
        path = flag_value(program(c)[1], flag)
        assert path, f"{flag} unset"
        mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "cairn-dataset-webhook-tls"
        # the keys of a kubernetes.io/tls Secret, as `kubectl create secret tls` names them
        assert Path(path).name in ("tls.crt", "tls.key")


def test_webhook_rbac_reads_claims_and_datasets_only():
    allowed = grants("cairn-dataset-webhook")
    for verb in ("get", "list", "watch"):
        assert ("", "persistentvolumeclaims", verb) in allowed
        assert ("data.cairn.io", "datasets", verb) in allowed
    assert {verb for _, _, verb in allowed} <= {"get", "list", "watch"}
