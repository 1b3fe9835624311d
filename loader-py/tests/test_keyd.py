"""The key service from Python: ``shardlock keyd`` (the CLI binary, started here on a
free loopback port with a CA made here) holds the keyring; the training process gets
only its URL, the CA and a token, streams exact epochs, and sees the service's
denials as the usual exceptions.

``make test`` sets ``SHARDLOCK_BIN`` to the CLI it built; without it these tests skip.
"""

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

import shardlock

BIN = os.environ.get("SHARDLOCK_BIN")
pytestmark = pytest.mark.skipif(not BIN, reason="SHARDLOCK_BIN (the shardlock CLI, with keyd) is not set")


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


def test_the_services_denial_is_the_usual_exception(env, numbers, keyd, make_pki):
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
    wrong_ca, _, _ = make_pki(other)
    loader = shardlock.Loader(path, keyring=url, ca_cert=wrong_ca, token=env.token("numbers"), trust=env.trust,
                              batch_size=16)
    with pytest.raises(shardlock.KeyUnavailable, match="TLS"):
        _epoch(loader)
    # TLS options without a key service are a mistake, said before anything opens.
    with pytest.raises(ValueError, match="key service"):
        shardlock.Loader(path, keyring=env.keyring, ca_cert=ca, token=narrow, trust=env.trust, batch_size=16)
