"""TLS and SuperNode authentication, run for real on loopback: a CA, the SuperLink's certificate and the
SuperNodes' keys are generated here with `cryptography`; the SuperLink runs with TLS and
`--enable-supernode-auth`; a registered SuperNode takes part in a round, an unregistered one is refused.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
from pathlib import Path

import pytest
from helpers import MEDMNIST_DIR

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'peft_deer[flower]')")
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _flower_has_supernode_auth() -> str | None:
    from peft_deer.flower.local import _executable

    flags = subprocess.run([_executable("flower-superlink"), "--help"], capture_output=True, text=True).stdout
    register = subprocess.run([_executable("flwr"), "supernode", "--help"], capture_output=True, text=True).stdout
    if "--enable-supernode-auth" not in flags or "register" not in register:
        return "the installed Flower has no --enable-supernode-auth / `flwr supernode register`"
    return None


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def make_pki(directory: Path, nodes: int) -> tuple[Path, Path, Path, list[tuple[Path, Path]]]:
    """(CA cert, server cert for 127.0.0.1/localhost, server key, [(node private key, node public key)])."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peft_deer test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file = _write(directory / "ca.crt", ca.public_bytes(pem))
    cert_file = _write(directory / "server.pem", server.public_bytes(pem))
    key_file = _write(
        directory / "server.key",
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    node_files = []
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        node_files.append((_write(directory / f"node{i}", private), _write(directory / f"node{i}.pub", public)))
    return ca_file, cert_file, key_file, node_files


@pytest.mark.e2e
def test_tls_and_supernode_auth_run_a_round_and_refuse_an_unregistered_node(tmp_path, one_thread):
    if not (MEDMNIST_DIR / "pneumoniamnist.npz").is_file():
        pytest.skip(f"real MedMNIST files not found at {MEDMNIST_DIR}")
    missing = _flower_has_supernode_auth()
    if missing:
        pytest.skip(missing)
    from peft_deer.flower.local import LocalDeployment, Tls, server_app_error

    ca, cert, key, nodes = make_pki(tmp_path, 2)
    out = tmp_path / "out"
    run_config = (
        f'model="tiny-vit" image-size=28 train-subset=100 rounds=1 num-clients=1 '
        f'data-dir="{MEDMNIST_DIR}" output-dir="{out}" node-wait-s=120'
    )
    node_config = {"data-dir": f'"{MEDMNIST_DIR}"', "num-partitions": 1, "state-dir": f'"{tmp_path / "state"}"'}
    tls = Tls(ca, cert, key, supernode_auth=True)
    keys = [private for private, _ in nodes]
    with LocalDeployment(2, tmp_path / "logs", node_config, {"OMP_NUM_THREADS": "1"}, tls, keys, False) as d:
        registered = d.register_node(nodes[0][1])
        assert registered.returncode == 0, registered.stdout + registered.stderr
        d.start_node(0)
        intruder = d.start_node(1, max_retries=2)  # node 1's key was never registered
        result = d.run(run_config, timeout_s=600)
        intruder_rc = intruder.wait(timeout=120)
    logs = {p.stem: p.read_text() for p in (tmp_path / "logs").glob("*.log")}
    assert server_app_error(result.stdout + result.stderr) is None, result.stdout[-3000:]
    assert (out / "summary.json").is_file(), result.stdout[-3000:] + logs["supernode-0"][-2000:]
    assert json.loads((out / "privacy.json").read_text())["transport"] == "flower"
    assert "SuperNode ID" in logs["supernode-0"]
    # The unregistered node is refused by the SuperLink for its key (not for TLS: node 0 used the same CA).
    assert intruder_rc != 0 and "SuperNode ID" not in logs["supernode-1"], logs["supernode-1"][-2000:]
    assert "Failed to activate SuperNode" in logs["supernode-1"]
    assert "No SuperNode found with the given public key" in logs["superlink"]
    assert f"https://127.0.0.1:{d.port}" in logs["superlink"]  # the SuperLink served TLS only
