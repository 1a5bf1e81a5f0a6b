"""A real Kubernetes control plane on 127.0.0.1 for the k8s tier, the way envtest runs one.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler come from one folder of
binaries (KUBEBUILDER_ASSETS; `./run.sh test` unpacks ../shared/k8s into .cache/k8s/<version>
and names it), etcd also from PATH. Each process listens on 127.0.0.1 on a free port, logs to
a file, and is stopped by its PID (cairn.localstack.Server).

Made at start: a small CA and a serving certificate signed by it (so clients verify TLS
against the CA), the service-account signing key pair, static tokens for the admin
(system:masters), kube-controller-manager and kube-scheduler users (RBAC's bootstrap roles
give the latter two what they need), and a kubeconfig per user.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import ssl
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from cairn import localstack

BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "k8s"
CACHE = REPO / ".cache" / "k8s"
DEPLOY = REPO / "deploy"
SERVICE_RANGE = "10.0.0.0/24"
# What of deploy/ a cluster without Cairn's pods can use: configuration, not workloads.
# Deployments, DaemonSets, Services and Secrets stay out, and so do webhook configurations
# (the API server would call a webhook service that does not run here).
CLUSTER_CONFIG = frozenset({
    "Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole",
    "ClusterRoleBinding", "Role", "RoleBinding", "CSIDriver", "StorageClass",
})  # fmt: skip
# kube-controller-manager runs what the tier needs, no more (start-up time, CPU): the PV
# binder and expander, the protection controllers that drop the finalizers admission puts
# on claims and volumes, service accounts (a pod needs its namespace's `default`), the root
# CA's ConfigMap, namespace deletion and owner-reference garbage collection. Not
# node-lifecycle: the tier's nodes have no kubelet, it would taint them unreachable.
CONTROLLERS = (
    "persistentvolume-binder-controller",
    "persistentvolume-expander-controller",
    "persistentvolume-protection-controller",
    "persistentvolumeclaim-protection-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "namespace-controller",
    "garbage-collector-controller",
    "-node-lifecycle-controller",
)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _complete(folder: Path) -> bool:
    return all(_executable(folder / b) for b in BINARIES)


def find_assets() -> tuple[Path | None, str]:
    """The folder of binaries to use, or None and the one-line reason the tier skips.

    KUBEBUILDER_ASSETS wins; without it, what `./run.sh test` unpacked before (so a plain
    `pytest tests/k8s` works after one run of it)."""
    named = os.environ.get("KUBEBUILDER_ASSETS", "")
    if named:
        folder = Path(named)
        missing = [b for b in BINARIES if not _executable(folder / b)]
        if missing:
            return None, f"KUBEBUILDER_ASSETS={named} lacks {', '.join(missing)}"
        folder_etcd = find_etcd(folder)
        if folder_etcd is None:
            return (
                None,
                f"no etcd in KUBEBUILDER_ASSETS={named} nor on PATH (apt-get install etcd-server)",
            )
        return folder, ""
    unpacked = (
        sorted((d for d in CACHE.glob("*") if _complete(d)), reverse=True) if CACHE.is_dir() else []
    )
    if unpacked and find_etcd(unpacked[0]):
        return unpacked[0], ""
    if SHARED.is_dir():
        return None, ("no Kubernetes control plane binaries: KUBEBUILDER_ASSETS is unset "
                      "(./run.sh test unpacks ../shared/k8s and sets it)")  # fmt: skip
    return None, ("no Kubernetes control plane binaries: KUBEBUILDER_ASSETS is unset and "
                  "../shared/k8s is absent")  # fmt: skip


def find_etcd(folder: Path) -> str | None:
    if _executable(folder / "etcd"):
        return str(folder / "etcd")
    return shutil.which("etcd")


# -- certificates and keys --------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    ca: Path  # the CA certificate clients trust
    cert: Path  # serving certificate (127.0.0.1, localhost, the kubernetes service names)
    key: Path
    sa_key: Path  # service-account token signing key (private)
    sa_pub: Path  # and its public half, which the apiserver verifies tokens with


def make_pki(folder: Path) -> PKI:
    """A one-day CA, a serving certificate it signed, and a service-account key pair
    (ECDSA P-256: quick to make, and every component takes it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    def usage(**on: bool) -> x509.KeyUsage:
        flags = dict.fromkeys(
            ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
            False,
        )  # fmt: skip
        return x509.KeyUsage(**{**flags, **on})

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("cairn-test-ca")
    ca = (
        builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
           "kubernetes.default.svc.cluster.local"]  # fmt: skip
    ips = [ipaddress.ip_address("127.0.0.1"),
           next(ipaddress.ip_network(SERVICE_RANGE).hosts())]  # fmt: skip
    cert = (
        builder(name("kube-apiserver"), ca_name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(d) for d in dns] + [x509.IPAddress(i) for i in ips]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    sa = ec.generate_private_key(ec.SECP256R1())

    def private(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())  # fmt: skip

    pki = PKI(folder / "ca.crt", folder / "serving.crt", folder / "serving.key",
              folder / "sa.key", folder / "sa.pub")  # fmt: skip
    _write(pki.ca, ca.public_bytes(serialization.Encoding.PEM))
    _write(pki.cert, cert.public_bytes(serialization.Encoding.PEM))
    _write(pki.key, private(key))
    _write(pki.sa_key, private(sa))
    _write(pki.sa_pub, sa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return pki


def _write(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


def write_kubeconfig(path: Path, server: str, ca: Path, user: str, token: str) -> Path:
    """A kubeconfig for one user (bearer token), trusting `ca`."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cairn-test",
                      "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "cairn-test", "user": user}}],
        "current-context": user,
    }  # fmt: skip
    _write(path, yaml.safe_dump(config, sort_keys=False))
    return path


# -- the processes ----------------------------------------------------------------------------


class StartError(Exception):
    """A component did not come up; the message ends with the tail of its log."""


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(line[:400] for line in text.splitlines()[-lines:]) or "(empty log)"


def _answers(url: str, context: ssl.SSLContext | None, token: str = "") -> bool:
    """Does GET `url` answer 200 (no proxy: everything is on 127.0.0.1)?"""
    handlers: list = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


@dataclass
class ControlPlane:
    """Started by `start()`, stopped by `stop()`; `kubeconfig` is the admin's."""

    assets: Path
    etcd_binary: str
    root: Path
    servers: list[localstack.Server] = field(default_factory=list)
    url: str = ""
    kubeconfig: Path | None = None
    pki: PKI | None = None
    started_in: float = 0.0
    deploy: list[dict] = field(default_factory=list)  # what of deploy/ the fixture applied

    def start(self, timeout: float = 90.0) -> ControlPlane:
        began = time.monotonic()
        try:
            self._start(began + timeout)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stops every component by its PID, newest first; drops etcd's data (its WAL alone
        is 64 MB), keeps the logs."""
        while self.servers:
            self.servers.pop().stop()
        shutil.rmtree(self.root / "etcd", ignore_errors=True)

    def _start(self, deadline: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        pki = self.pki = make_pki(self.root / "pki")
        tokens = {
            user: secrets.token_hex(16) for user in ("admin", "controller-manager", "scheduler")
        }
        _write(self.root / "tokens.csv", "".join((
            f'{tokens["admin"]},admin,admin,"system:masters"\n',
            f'{tokens["controller-manager"]},system:kube-controller-manager,'
            "system:kube-controller-manager\n",
            f'{tokens["scheduler"]},system:kube-scheduler,system:kube-scheduler\n',
        )))  # fmt: skip
        trust = ssl.create_default_context(cafile=str(pki.ca))

        etcd_port, peer_port, api_port, kcm_port, sched_port = (
            localstack.free_port() for _ in range(5)
        )
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd = self._launch("etcd", [
            self.etcd_binary, "--name", "cairn-test", "--data-dir", str(self.root / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"cairn-test={peer_url}", "--unsafe-no-fsync",
            "--logger", "zap"])  # fmt: skip
        self._wait(etcd, lambda: _answers(f"{etcd_url}/health", None), deadline)

        self.url = f"https://127.0.0.1:{api_port}"
        api = self._launch("kube-apiserver", [
            str(self.assets / "kube-apiserver"), f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}", f"--tls-cert-file={pki.cert}",
            f"--tls-private-key-file={pki.key}", f"--client-ca-file={pki.ca}",
            f"--token-auth-file={self.root / 'tokens.csv'}",
            "--authorization-mode=RBAC", f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_RANGE}", "--allow-privileged=true",
            "--profiling=false"])  # fmt: skip
        admin = tokens["admin"]
        self._wait(api, lambda: _answers(f"{self.url}/readyz", trust, admin), deadline)
        self.kubeconfig = write_kubeconfig(self.root / "admin.kubeconfig", self.url, pki.ca,
                                           "admin", admin)  # fmt: skip

        kcm_config = write_kubeconfig(self.root / "controller-manager.kubeconfig", self.url,
                                      pki.ca, "system:kube-controller-manager",
                                      tokens["controller-manager"])  # fmt: skip
        kcm = self._launch("kube-controller-manager", [
            str(self.assets / "kube-controller-manager"), f"--kubeconfig={kcm_config}",
            "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
            f"--tls-cert-file={pki.cert}", f"--tls-private-key-file={pki.key}",
            "--leader-elect=false", f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca}", "--use-service-account-credentials=true",
            f"--controllers={','.join(CONTROLLERS)}", "--profiling=false"])  # fmt: skip
        sched_config = write_kubeconfig(self.root / "scheduler.kubeconfig", self.url, pki.ca,
                                        "system:kube-scheduler", tokens["scheduler"])  # fmt: skip
        scheduler = self._launch("kube-scheduler", [
            str(self.assets / "kube-scheduler"), f"--kubeconfig={sched_config}",
            "--bind-address=127.0.0.1", f"--secure-port={sched_port}",
            f"--tls-cert-file={pki.cert}", f"--tls-private-key-file={pki.key}",
            "--leader-elect=false", "--profiling=false"])  # fmt: skip
        # Both start at once; each is waited for in turn.
        self._wait(kcm, lambda: _answers(f"https://127.0.0.1:{kcm_port}/healthz", trust), deadline)
        self._wait(
            scheduler, lambda: _answers(f"https://127.0.0.1:{sched_port}/readyz", trust), deadline
        )

    def _launch(self, name: str, argv: list[str]) -> localstack.Server:
        server = localstack.Server(name, argv, self.root / f"{name}.log")
        self.servers.append(server)
        server.start(lambda: True)  # started; readiness is _wait's
        return server

    @staticmethod
    def _wait(server: localstack.Server, ready: Callable[[], bool], deadline: float) -> None:
        assert server.proc is not None
        while True:
            code = server.proc.poll()
            if code is not None:
                raise StartError(f"{server.name} exited with code {code} at start; the end of "
                                 f"{server.log_path}:\n{log_tail(server.log_path)}")  # fmt: skip
            if ready():
                return
            if time.monotonic() > deadline:
                raise StartError(f"{server.name} was not ready in time; the end of "
                                 f"{server.log_path}:\n{log_tail(server.log_path)}")  # fmt: skip
            time.sleep(0.1)
