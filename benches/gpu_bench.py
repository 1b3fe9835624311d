"""GPU measurements of scripts/gpu-check; prints one JSON object.

Needs: a CUDA GPU, torch, the shardlock module on PYTHONPATH, SHARDLOCK_BIN (the CLI
built with the cuda feature), WORK (a scratch directory). Datasets are random uint8:
"images" 3x224x224 (147 KiB) samples, batch 64, and "tokens" 8 KiB samples, batch 256.
"""

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import shardlock

CLI = os.environ.get("SHARDLOCK_BIN", "shardlock")
WORK = pathlib.Path(os.environ.get("WORK", "/tmp/shardlock-gpu-check"))
SMALL = os.environ.get("SMALL", "0") == "1"


def run(*args: str) -> str:
    return subprocess.run([CLI, *args], check=True, capture_output=True, text=True).stdout


def log_tail(path: pathlib.Path, n: int = 12) -> list:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def make_dataset(name: str, shape: tuple, n: int) -> pathlib.Path:
    d = WORK / name
    inp = d / "input"
    inp.mkdir(parents=True)
    rng = np.random.default_rng(0)
    mm = np.lib.format.open_memmap(inp / "x.npy", mode="w+", dtype=np.uint8, shape=(n, *shape))
    step = max(1, (64 << 20) // int(np.prod(shape)))
    for i in range(0, n, step):
        mm[i : i + step] = rng.integers(0, 256, size=(min(step, n - i), *shape), dtype=np.uint8)
    mm.flush()
    del mm
    run("pack", "--keyring", str(WORK / "keyring.json"), "--issuer-key", str(WORK / "issuer.key"), "--dataset-id", name,
        "--shard-size", "64MiB", "--out", str(d / "ds"), "--json", str(inp / "x.npy"))
    run("token", "issue", "--issuer-key", str(WORK / "issuer.key"), "--dataset", name, "--principal", "gpu-check",
        "--ttl", "2h", "--out", str(d / "job.token"))
    shutil.rmtree(inp)
    return d


def cli_bench(
    d: pathlib.Path, batch: int, shuffle: str, device: bool, epochs: int = 4, pageable: bool = False, workers: int = 0
) -> dict:
    args = ["bench", str(d / "ds"), "--keyring", str(WORK / "keyring.json"), "--token", str(d / "job.token"),
            "--trust", str(WORK / "issuer.key.pub"), "--batch-size", str(batch), "--epochs", str(epochs),
            "--shuffle", shuffle, "--json"]
    if device:
        args += ["--device", "cuda:0"] + (["--pageable"] if pageable else [])
    if workers:
        args += ["--workers", str(workers)]
    r = json.loads(run(*args))
    warm = [e["gb_per_s"] for e in r["epochs"][1:]] or [r["epochs"][0]["gb_per_s"]]
    out = {"median_gb_per_s": round(statistics.median(warm), 2), "epoch1_gb_per_s": round(r["epochs"][0]["gb_per_s"], 2),
           "cpu_utilisation": round(statistics.median(e["cpu_utilisation"] for e in r["epochs"]), 2),
           "p99_batch_ms": round(max(e["p99_batch_ms"] for e in r["epochs"][1:] or r["epochs"]), 3)}
    if "h2d" in r:
        out["h2d"] = r["h2d"]
    return out


def torch_h2d(nbytes: int, iters: int = 200) -> float:
    x = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    for _ in range(3):
        x.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        x.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    return nbytes * iters / (time.perf_counter() - t) / 1e9


def loader(d: pathlib.Path, batch: int, **kw) -> shardlock.Loader:
    return shardlock.Loader(d / "ds", keyring=WORK / "keyring.json", token=d / "job.token",
                            trust=WORK / "issuer.key.pub", batch_size=batch, device="cuda:0", **kw)


def python_to_device(d: pathlib.Path, batch: int, epochs: int = 3) -> float:
    ld = loader(d, batch, shuffle="window")
    rates = []
    for _ in range(epochs):
        torch.cuda.synchronize()
        t, nbytes = time.perf_counter(), 0
        for b in ld:
            nbytes += b["x"].numel()
        torch.cuda.synchronize()
        rates.append(nbytes / (time.perf_counter() - t) / 1e9)
    return round(statistics.median(rates[1:]), 2)


def matmul_consumer(d: pathlib.Path, batch: int, step_ms: float) -> dict:
    """A training-like consumer: each batch's u8 image bytes become a bf16 [batch, 4096]
    slice of an [8192, 4096] activation, then k chained [8192, 4096] x [4096, 4096]
    matmuls, k chosen so one step's compute is about `step_ms`. GPU idle = 1 - (busy
    time, from CUDA events around each step) / wall time over a warm epoch."""
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    act = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        act @ w
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        act @ w
    torch.cuda.synchronize()
    per = (time.perf_counter() - t) / 20
    k = max(1, round(step_ms / 1e3 / per))
    ld = loader(d, batch, shuffle="window")
    for b in ld:  # warm epoch: page cache, pools, registrations
        pass
    events = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in ld:
        x = b["x"].view(b["x"].shape[0], -1)[:, :4096]
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        act[: x.shape[0]].copy_(x)
        y = act
        for _ in range(k):
            y = y @ w
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    busy = sum(s.elapsed_time(e) for s, e in events) / 1e3
    steps = len(events)
    return {"steps": steps, "matmuls_per_step": k, "step_compute_ms": round(busy / max(steps, 1) * 1e3, 3),
            "wall_s": round(wall, 3), "gpu_idle_fraction": round(max(0.0, 1 - busy / wall), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rust-rc", type=int, default=-1)
    ap.add_argument("--py-rc", type=int, default=-1)
    a = ap.parse_args()
    t_start = time.perf_counter()
    out: dict = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rust_tests": {"ok": a.rust_rc == 0, "tail": log_tail(WORK / "rust-tests.log", 8)},
        "python_tests": {"ok": a.py_rc == 0, "tail": log_tail(WORK / "py-tests.log", 4)},
    }
    try:
        run("keygen", "kek", "--out", str(WORK / "keyring.json"))
        run("keygen", "issuer", "--out", str(WORK / "issuer.key"))
        scale = 8 if SMALL else 1
        images = make_dataset("images", (3, 224, 224), 8192 // scale)
        tokens = make_dataset("tokens", (8192,), 131072 // scale)
        res: dict = {}
        for name, d, bs in (("images_147KiB", images, 64), ("tokens_8KiB", tokens, 256)):
            r = {f"device_{s}": cli_bench(d, bs, s, True) for s in ("none", "window")}
            r["host_window"] = cli_bench(d, bs, "window", False)
            r["device_window_pageable"] = cli_bench(d, bs, "window", True, pageable=True)
            res[name] = r
        h = res["images_147KiB"]["device_window"]["h2d"]
        t_gbps = torch_h2d(int(h["bytes"]))
        out["h2d"] = {"bytes": h["bytes"], "shardlock_pinned_pool_gb_per_s": round(h["gb_per_s"], 2),
                      "torch_pinned_to_cuda_gb_per_s": round(t_gbps, 2), "ratio": round(h["gb_per_s"] / t_gbps, 3)}
        for name in res:
            for r in res[name].values():
                if isinstance(r, dict):
                    r.pop("h2d", None)
        out["loader_to_device"] = res
        out["python_loader_to_device_gb_per_s"] = {"images_147KiB": python_to_device(images, 64),
                                                   "tokens_8KiB": python_to_device(tokens, 256)}
        out["matmul_consumer_images"] = {f"{ms}ms_step": matmul_consumer(images, 64, ms) for ms in (2.0, 0.5)}
        out["host_scaling_images_none"] = {w: cli_bench(images, 64, "none", False, workers=w)["median_gb_per_s"]
                                           for w in (1, 4, 8, 16)}
    except Exception as e:  # report what failed, in the one JSON object
        out["error"] = f"{type(e).__name__}: {e}"
        if isinstance(e, subprocess.CalledProcessError):
            out["stderr"] = (e.stderr or "")[-2000:]
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    js = json.dumps(out, indent=1)
    print(js)
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "gpu-check.json").write_text(js)
    sys.exit(0 if out["rust_tests"]["ok"] and out["python_tests"]["ok"] and "error" not in out else 1)


if __name__ == "__main__":
    main()
