"""torchrun --nproc_per_node=2 (gloo, CPU): ranks are disjoint, cover the epoch, and
repeat across runs with the same seed. Also runs the training examples: plain PyTorch,
Lightning, the Hugging Face Trainer and torchrun with DataLoader workers."""

import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def torchrun(env, path, token, out):
    script = env.root / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, torch.distributed as dist, shardlock
        dist.init_process_group("gloo")
        dist.barrier()  # both ranks connected before either can finish and tear down
        l = shardlock.Loader({str(path)!r}, keyring={str(env.keyring)!r}, token={str(token)!r},
                             trust={str(env.trust)!r}, batch_size=10, seed=5, sample_ids=True)
        assert (l.rank, l.world_size) == (dist.get_rank(), 2)
        ids = [i for b in l for i in b["sample_id"].tolist()]
        with open(f"{out}.{{dist.get_rank()}}", "w") as f:
            json.dump(ids, f)
        dist.barrier()
        dist.destroy_process_group()
    """))
    # --standalone picks a free port; gloo on loopback needs no network.
    run_env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                       capture_output=True, text=True, timeout=300, env=run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(pathlib.Path(f"{out}.{r}").read_text()) for r in (0, 1)]


def test_torchrun_two_ranks(env, numbers):
    path, _, _ = numbers
    token = env.token("numbers")
    a = torchrun(env, path, token, env.root / "run1")
    b = torchrun(env, path, token, env.root / "run2")
    assert a == b, "same seed, same split"
    r0, r1 = a
    assert len(r0) == len(r1) == 500
    assert not set(r0) & set(r1)
    assert set(r0) | set(r1) == set(range(1000))


def run_example(name, *args, timeout=300, runner=None):
    cmd = (runner or [sys.executable]) + [str(ROOT / "examples" / name), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, GLOO_SOCKET_IFNAME="lo"))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r.stdout


def test_lightning_example_gets_every_sample_once_per_epoch_and_learns():
    pytest.importorskip("lightning", reason="lightning is not installed (make test installs it)")
    out = run_example("train_lightning.py", "--samples", 4000, "--epochs", 3)
    assert [f"epoch {e}: " in out for e in range(3)] == [True] * 3
    assert out.count("4000 distinct samples") == 3


def test_hugging_face_trainer_example_gets_every_sample_once_per_epoch_and_learns():
    pytest.importorskip("transformers", reason="transformers is not installed (make test installs it)")
    pytest.importorskip("accelerate", reason="accelerate is not installed (make test installs it)")
    out = run_example("train_hf.py", "--samples", 4000, "--epochs", 3)
    assert out.count("4000 distinct samples") == 3


def test_torchrun_example_splits_ranks_with_dataloader_workers(tmp_path):
    run_example("train_ddp.py", tmp_path, "--prepare")
    out = run_example("train_ddp.py", tmp_path, runner=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                         "--nproc-per-node", "2"])
    assert out.count("2 ranks read [4000, 4000] disjoint samples") == 3, out


def test_train_torch_example_loss_falls():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "train_torch.py"), "--samples", "4000", "--epochs", "3"],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    assert "epoch 2" in out


def test_rank_and_world_size_come_from_the_environment_without_a_process_group(env, numbers, monkeypatch, caplog):
    import shardlock
    import shardlock.torch as sltorch
    import torch

    path, _, _ = numbers
    token = env.token("numbers")
    kw = dict(keyring=env.keyring, token=token, trust=env.trust, batch_size=10, sample_ids=True, seed=5)
    ids, via_workers = {}, {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        with caplog.at_level(logging.INFO, logger="shardlock"):
            loader = shardlock.Loader(path, **kw)
        assert (loader.rank, loader.world_size) == (rank, 2)
        assert "RANK/WORLD_SIZE environment" in caplog.text
        ids[rank] = [i for b in loader for i in b["sample_id"].tolist()]
        ds = sltorch.IterableDataset(path, **kw)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        via_workers[rank] = [i for b in dl for i in b["sample_id"].tolist()]
        # Explicit values win.
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="shardlock"):
            assert shardlock.Loader(path, rank=0, world_size=1, **kw).world_size == 1
        assert "rank=/world_size= arguments" in caplog.text
    for split in (ids, via_workers):
        assert len(split[0]) == len(split[1]) == 500 and sorted(split[0] + split[1]) == list(range(1000))
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK"):
        shardlock.Loader(path, **kw)
