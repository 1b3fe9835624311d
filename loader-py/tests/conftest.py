"""Shared fixtures: keys, a token, small datasets."""

import datetime
import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

import shardlock


class Env:
    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.keyring = root / "keyring.json"
        self.issuer = root / "issuer.key"
        shardlock.create_keyring(self.keyring)
        self.trust = pathlib.Path(shardlock.create_issuer_key(self.issuer))

    def token(self, dataset: str, name: str = "job.token", **kw) -> pathlib.Path:
        p = self.root / name
        kw.setdefault("principal", "pytest")
        shardlock.issue_token(self.issuer, p, dataset=dataset, **kw)
        return p

    def pack(self, name: str, arrays, dataset: str = None, shard_size: int = 1 << 16) -> pathlib.Path:
        out = self.root / name
        shardlock.pack_numpy(out, arrays, keyring=self.keyring, issuer_key=self.issuer, dataset_id=dataset or name, shard_size=shard_size)
        return out

    def loader(self, path, dataset=None, **kw):
        kw.setdefault("batch_size", 8)
        token = kw.pop("token", None) or self.token(dataset or path.name)
        return shardlock.Loader(path, keyring=self.keyring, token=token, trust=self.trust, **kw)


@pytest.fixture
def env(tmp_path: pathlib.Path) -> Env:
    return Env(tmp_path)


@pytest.fixture
def numbers(env: Env):
    """1000 samples: x = f32[4] (i, i+0.5, -i, 7), y = i64 i, over several shards."""
    n = 1000
    i = np.arange(n)
    x = np.stack([i, i + 0.5, -i, np.full(n, 7)], axis=1).astype(np.float32)
    path = env.pack("numbers", {"x": x, "y": i.astype(np.int64)}, shard_size=4096)
    return path, x, i


#: The shardlock CLI (``make test`` sets it): the key service the ``keyd`` fixture starts.
KEYD_BIN = os.environ.get("SHARDLOCK_BIN")


def _pki(root: pathlib.Path):
    """A CA and a server certificate for 127.0.0.1, as PEM files; returns (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pytest CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyd")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = root / "ca.pem", root / "server.pem", root / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(paths[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return paths


@pytest.fixture
def make_pki():
    """``make_pki(dir)`` writes a fresh CA and a server certificate for 127.0.0.1 there:
    (ca, cert, key) paths."""
    return _pki


@pytest.fixture
def keyd(env):
    """A running key service (``shardlock keyd``, the CLI ``SHARDLOCK_BIN`` names) over
    the env's keyring: (url, ca, audit log path). Skipped without ``SHARDLOCK_BIN``."""
    if not KEYD_BIN:
        pytest.skip("SHARDLOCK_BIN (the shardlock CLI, with keyd) is not set")
    ca, cert, key = _pki(env.root)
    audit = env.root / "keyd-audit.jsonl"
    proc = subprocess.Popen(
        [KEYD_BIN, "keyd", "--listen", "127.0.0.1:0", "--json", "--keyring", str(env.keyring), "--trust", str(env.trust),
         "--tls-cert", str(cert), "--tls-key", str(key), "--audit-log", str(audit)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"keyd did not start: {proc.stderr.read()}")
        url = json.loads(line)["listening"]
        yield url, ca, audit
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, "keyd did not stop cleanly on SIGTERM"
