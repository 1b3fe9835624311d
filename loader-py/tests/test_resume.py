"""Resume mid-epoch in a new process, also with world size 2 -> 1."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shardlock


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, capture_output=True, text=True).stdout


def test_resume_in_a_new_process_with_a_smaller_world(env, numbers):
    path, _, _ = numbers
    token = env.token("numbers")
    common = f"""
        import json, shardlock
        def make(rank, world):
            return shardlock.Loader({str(path)!r}, keyring={str(env.keyring)!r}, token={str(token)!r},
                                    trust={str(env.trust)!r}, batch_size=16, seed=11, rank=rank, world_size=world,
                                    sample_ids=True, drop_last=False)
    """
    first = run(common + """
        seen, state = [], None
        for r in (0, 1):
            l = make(r, 2)
            it = iter(l)
            for _ in range(5):
                seen += next(it)["sample_id"].tolist()
            state = l.state_dict()
        print(json.dumps({"seen": seen, "state": state}))
    """)
    data = json.loads(first)
    rest = json.loads(run(common + f"""
        l = make(0, 1)
        l.load_state_dict(json.loads({json.dumps(json.dumps(data["state"]))}))
        print(json.dumps([i for b in l for i in b["sample_id"].tolist()]))
    """))
    allids = data["seen"] + rest
    assert len(allids) == len(set(allids)) == 1000


def test_min_generation_and_repack_generations(env):
    """Security review finding 2: ``min_generation`` in the Python ``Loader``, and a
    re-pack (``force=True``) continuing the generation instead of restarting at 1."""
    x = np.arange(40, dtype=np.int64)
    env.pack("g", {"x": x}, dataset="g")
    shardlock.pack_numpy(env.root / "g", {"x": x[:20]}, keyring=env.keyring, issuer_key=env.issuer, dataset_id="g", force=True)
    assert sum(len(b["x"]) for b in env.loader(env.root / "g", dataset="g", min_generation=2)) == 16
    with pytest.raises(shardlock.IntegrityError) as e:
        env.loader(env.root / "g", dataset="g", min_generation=3)
    assert e.value.kind == "rollback"
    with pytest.raises(ValueError, match="min_generation"):
        env.loader(env.root / "g", dataset="g", min_generation=0)


def test_a_token_can_require_a_minimum_generation(env):
    """Finding 2, token side: ``min_generation`` written by the issuer or added by
    ``attenuate_token`` denies an older generation with reason ``stale_generation``."""
    x = np.arange(16, dtype=np.int64)
    env.pack("h", {"x": x}, dataset="h")
    strict = env.token("h", name="strict.token", min_generation=2)
    with pytest.raises(shardlock.AccessDenied) as e:
        list(env.loader(env.root / "h", dataset="h", token=strict))
    assert e.value.reason == "stale_generation"
    loose = env.token("h", name="loose.token")
    narrowed = env.root / "narrowed.token"
    shardlock.attenuate_token(loose, env.trust, narrowed, min_generation=2)
    with pytest.raises(shardlock.AccessDenied) as e:
        list(env.loader(env.root / "h", dataset="h", token=narrowed))
    assert e.value.reason == "stale_generation"
    # After a re-pack (generation 2) both tokens read it.
    shardlock.pack_numpy(env.root / "h", {"x": x}, keyring=env.keyring, issuer_key=env.issuer, dataset_id="h", force=True)
    for tok in (strict, narrowed):
        assert sum(len(b["x"]) for b in env.loader(env.root / "h", dataset="h", token=tok)) == 16
