"""Key custody in a PKCS#11 HSM (SoftHSM2) from Python: ``keyring=`` takes a ``pkcs11:``
URI; pack -> token -> stream through it, DataLoader workers, typed errors.

SoftHSM2 reads ``SOFTHSM2_CONF`` and lists its tokens once per process (at the first
C_Initialize), so one session fixture creates the configuration and every token these
tests use before anything opens the module. Without SoftHSM2 the tests fail saying how
to install it; they do not skip.
"""

import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

import shardlock
import shardlock.torch as sltorch

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "314159"
PIN_ENV = "SHARDLOCK_PYTEST_HSM_PIN"
TOKENS = ["py-e2e", "py-workers", "py-errors"]


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    if not os.path.isfile(MODULE) or shutil.which("softhsm2-util") is None:
        pytest.fail("SoftHSM2 is not installed: run `apt-get install softhsm2` (make test installs it)")
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    for label in TOKENS:
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", "27182818"],
            env=env, check=True, capture_output=True,
        )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ[PIN_ENV] = PIN
    return conf


def uri(token: str, obj: str, extra: str = "") -> str:
    return f"pkcs11:token={token};object={obj}?module-path={MODULE}&pin-source=env:{PIN_ENV}{extra}"


def numbers(n: int = 600):
    i = np.arange(n)
    return {"x": np.stack([i, -i, i * 2], axis=1).astype(np.int32), "y": i.astype(np.int64)}


def test_pack_token_stream_through_the_hsm(softhsm, env):
    kek = uri("py-e2e", "kek")
    kek_id = shardlock.create_hsm_kek(kek)
    assert kek_id.startswith("kek-")
    with pytest.raises(shardlock.KeyUnavailable) as e:
        shardlock.create_hsm_kek(kek)  # never replaces a key
    assert e.value.kind == "already_exists"

    arrays = numbers()
    out = env.root / "hsm"
    shardlock.pack_numpy(out, arrays, keyring=kek, issuer_key=env.issuer, dataset_id="py-hsm", shard_size=2048)
    manifest = (out / "manifest.json").read_text()
    assert manifest.count(kek_id) >= 4  # every shard's DEK is wrapped under the HSM KEK
    audit = env.root / "audit.jsonl"
    loader = shardlock.Loader(
        out, keyring=kek, token=env.token("py-hsm"), trust=env.trust, batch_size=32,
        shuffle="global", drop_last=False, sample_ids=True, audit_log=audit,
    )
    seen = []
    for batch in loader:
        ids = batch["sample_id"].numpy()
        assert isinstance(batch["x"], torch.Tensor)
        np.testing.assert_array_equal(batch["x"].numpy(), arrays["x"][ids])
        np.testing.assert_array_equal(batch["y"].numpy(), arrays["y"][ids])
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(600))
    log = audit.read_text()
    assert "pkcs11 token" in log and PIN not in log

    # The keyring file cannot open what the HSM wrapped: a typed KeyUnavailable.
    with pytest.raises(shardlock.KeyUnavailable, match="no such KEK"):
        next(iter(env.loader(out, dataset="py-hsm")))


def test_dataloader_workers_reopen_the_hsm_after_fork(softhsm, env):
    kek = uri("py-workers", "kek")
    shardlock.create_hsm_kek(kek)
    out = env.root / "w"
    shardlock.pack_numpy(out, numbers(), keyring=kek, issuer_key=env.issuer, dataset_id="py-w", shard_size=2048)
    ds = sltorch.IterableDataset(
        out, keyring=kek, token=env.token("py-w"), trust=env.trust,
        batch_size=25, shuffle="global", sample_ids=True, drop_last=False,
    )
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    ids = [int(i) for b in dl for i in b["sample_id"]]
    assert len(ids) == len(set(ids)) and len(ids) >= 598 and set(ids) <= set(range(600))


def test_bad_inputs_are_typed_and_never_show_the_pin(softhsm, env, tmp_path):
    arrays = numbers(50)

    def pack(keyring):
        shardlock.pack_numpy(tmp_path / "out", arrays, keyring=keyring, issuer_key=env.issuer, dataset_id="e", force=True)

    # A wrong PIN is sent to the token once, however often it is retried.
    bad = tmp_path / "bad.pin"
    bad.write_text("999999\n")
    bad.chmod(0o600)
    wrong = f"pkcs11:token=py-errors;object=kek?module-path={MODULE}&pin-source=file:{bad}"
    for attempt in range(3):
        with pytest.raises(shardlock.KeyUnavailable) as e:
            pack(wrong)
        assert e.value.kind == "pin_incorrect" and "999999" not in str(e.value)
        assert str(bad) in str(e.value)  # names the PIN source
        assert ("not tried again" in str(e.value)) == (attempt > 0)

    shardlock.create_hsm_kek(uri("py-errors", "kek"))
    cases = [
        (uri("py-errors", "absent"), "kek_not_found", "shardlock keygen kek --pkcs11"),
        (uri("no-such-token", "kek"), "token_not_found", "py-errors"),
        (uri("py-errors", "kek").replace(MODULE, "/nonexistent/lib.so"), "module_load", "apt-get install softhsm2"),
        (uri("py-errors", "kek").replace(PIN_ENV, "SHARDLOCK_PYTEST_UNSET"), "pin_source", "is not set"),
    ]
    for keyring, kind, hint in cases:
        with pytest.raises(shardlock.KeyUnavailable) as e:
            pack(keyring)
        assert e.value.kind == kind, e.value
        assert hint in str(e.value)
        assert "pkcs11 token" in e.value.provider
    pack(uri("py-errors", "kek"))

    with pytest.raises(ValueError, match="pin-value is refused"):
        pack(uri("py-errors", "kek", f"&pin-value={PIN}"))
