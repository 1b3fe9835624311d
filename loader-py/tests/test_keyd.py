"""The key service from Python: ``shardlock keyd`` (the CLI binary, started here on a
free loopback port with a CA made here) holds the keyring; the training process gets
only its URL, the CA and a token, streams exact epochs, and sees the service's
denials as the usual exceptions.

``make test`` sets ``SHARDLOCK_BIN`` to the CLI it built; without it these tests skip.
"""

import datetime
import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

import shardlock

BIN = os.environ.get("SHARDLOCK_BIN")
pytestmark = pytest.mark.skipif(not BIN, reason="SHARDLOCK_BIN (the shardlock CLI, with keyd) is not set")


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
def keyd(env):
    """A running key service over the env's keyring: (url, ca, audit log path)."""
    ca, cert, key = _pki(env.root)
    audit = env.root / "keyd-audit.jsonl"
    proc = subprocess.Popen(
        [BIN, "keyd", "--listen", "127.0.0.1:0", "--json", "--keyring", str(env.keyring), "--trust", str(env.trust),
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


def _epoch(loader):
    out = []
    for batch in loader:
        out.extend(batch["y"].tolist())
    return out


def test_a_process_without_the_keyring_streams_exact_epochs_from_the_service(env, numbers, keyd):
    path, x, i = numbers
    url, ca, audit = keyd
    token = env.token("numbers")
    kw = dict(token=token, trust=env.trust, batch_size=16, seed=3, drop_last=False)
    remote = shardlock.Loader(path, keyring=url, ca_cert=ca, **kw)
    local = shardlock.Loader(path, keyring=env.keyring, **kw)
    for epoch in range(2):
        got = _epoch(remote)
        assert got == _epoch(local), f"epoch {epoch}"
        assert sorted(got) == list(range(1000))
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    released = [r for r in records if r["event"] == "key_release" and r["decision"] == "allow"]
    shards = len(json.loads((path / "manifest.json").read_text())["body"]["shards"])
    assert len(released) == 2 * shards
    assert all(r["principal"] == "pytest" for r in released)
    # The service's log is hash-chained; `shardlock audit verify` checks it.
    check = subprocess.run([BIN, "audit", "verify", str(audit), "--json"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert str(len(records)) in check.stdout


def test_the_services_denial_is_the_usual_exception(env, numbers, keyd):
    path, _, _ = numbers
    url, ca, audit = keyd
    narrow = env.token("numbers", name="narrow.token", shards="0")
    loader = shardlock.Loader(path, keyring=url, ca_cert=ca, token=narrow, trust=env.trust, batch_size=16,
                              shuffle="none")
    with pytest.raises(shardlock.OutOfScope) as e:
        _epoch(loader)
    assert e.value.reason == "shard_out_of_scope"
    assert e.value.shard == 1
    # A CA that did not sign the service's certificate: a clear KeyUnavailable.
    other = env.root / "other"
    other.mkdir()
    wrong_ca, _, _ = _pki(other)
    loader = shardlock.Loader(path, keyring=url, ca_cert=wrong_ca, token=env.token("numbers"), trust=env.trust,
                              batch_size=16)
    with pytest.raises(shardlock.KeyUnavailable, match="TLS"):
        _epoch(loader)
    # TLS options without a key service are a mistake, said before anything opens.
    with pytest.raises(ValueError, match="key service"):
        shardlock.Loader(path, keyring=env.keyring, ca_cert=ca, token=narrow, trust=env.trust, batch_size=16)
