"""shardlock side by side with the loaders users run today (`make compare`):

    python benches/compare/run.py [--small] [--data DIR] [--out DIR] [--keep]

For each shape (tokens: 8 KiB samples, images: 3x224x224), prepares the same random
plaintext once in every loader's format (timing each pack), then reads it through each
loader for two epochs, shuffle on, each loader in its own process. Writes compare.json,
compare.md and compare.png to --out. Exits 1 when any loader yields a wrong sample or a
run fails; a peer whose package did not install is reported as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import shapes  # noqa: E402
import report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

#: Formats to prepare: step -> the pip package it needs (None: always there).
PREP_STEPS = {"plain": None, "disk": None, "shardlock": None, "handrolled": "cryptography", "litdata": "litdata",
              "litdata-fernet": "litdata", "mds": "mosaicml-streaming", "parquet": None, "shardlock-parquet": None,
              "litdata-parquet": "litdata", "mds-parquet": "mosaicml-streaming"}
#: Steps that only time a pack (nothing reads their output): dropped by --only.
PACK_ONLY = {"disk", "parquet", "shardlock-parquet", "litdata-parquet", "mds-parquet"}

#: (loader, prepared format it reads, encrypted?); the peers run with DataLoader
#: num_workers 0 and 2, shardlock with its own decrypt threads.
PEERS = [("torch-memmap", "plain", False), ("litdata", "litdata", False),
         ("litdata-fernet", "litdata-fernet", True), ("handrolled", "handrolled", True), ("mds", "mds", False)]
LOADERS = [("shardlock-window", 0, "shardlock", True), ("shardlock-global", 0, "shardlock", True)] + [
    (name, workers, step, enc) for name, step, enc in PEERS for workers in (0, 2)]


def install_status(venv: str, package: Optional[str]) -> Optional[str]:
    """None when `package` installed, else why not (from benches/compare/install.sh)."""
    if package is None:
        return None
    path = os.path.join(venv, "compare-peers", f"{package}.status")
    if not os.path.exists(path):
        return f"{package} not installed (run `make compare`, which installs the peers)"
    text = open(path).read().strip()
    return None if text == "ok" else text


def _tree_rss_kib(pid: int) -> tuple:
    """(RSS, anonymous RSS) in KiB, summed over a process and its descendants."""
    try:
        import psutil
    except ImportError:
        return 0, 0
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0, 0
    rss = anon = 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1])
        except OSError:
            pass
    return rss, anon


def measure(cmd: List[str], timeout: float, log: str) -> Dict:
    """Runs `cmd`, sampling the summed RSS of its process tree every 50 ms; returns its
    JSON output with rc, wall and CPU seconds (with its reaped children) and peaks."""
    with open(log, "w") as err, open(log + ".out", "w+") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err)
        peak = peak_anon = 0
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                p.kill()
            rss, anon = _tree_rss_kib(p.pid)
            peak, peak_anon = max(peak, rss), max(peak_anon, anon)
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        lines = out.read().strip().splitlines()
    r: Dict = {"rc": p.returncode, "wall_s": wall, "cpu_s_process": ru.ru_utime + ru.ru_stime,
               "peak_rss_mib": max(peak, ru.ru_maxrss) / 1024, "peak_anon_mib": peak_anon / 1024}
    if p.returncode == 0 and lines:
        r.update(json.loads(lines[-1]))
    else:
        tail = open(log).read()[-1500:]
        last = next((ln.strip() for ln in reversed(tail.splitlines()) if ln.strip()), "")
        r["error"] = f"exit {p.returncode}" + (" (timed out)" if wall > timeout else "") + f": {last}"
        r["stderr_tail"] = tail
    return r


def render(results: Dict, out: str) -> int:
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(report.markdown(results, shapes(results["small"])))
    report.chart(results, os.path.join(out, "compare.png"))
    print(open(os.path.join(out, "compare.md")).read())
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="~30 MB per shape: a smoke run")
    ap.add_argument("--data", default="target/compare-data")
    ap.add_argument("--out", default="benches/results")
    ap.add_argument("--venv", default=os.path.dirname(os.path.dirname(sys.executable)))
    ap.add_argument("--keep", action="store_true", help="keep the prepared data")
    ap.add_argument("--only", help="comma-separated loaders (default: all)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md and .png from a compare.json")
    a = ap.parse_args()
    if a.render:
        return render(json.load(open(a.render)), a.out)
    os.makedirs(a.out, exist_ok=True)
    logs = a.data.rstrip("/") + "-logs"
    shutil.rmtree(a.data, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    os.makedirs(logs)
    os.makedirs(a.data)
    small = ["--small"] if a.small else []
    timeout = 300 if a.small else 900
    started = time.time()
    facts = report.machine_facts(a.venv)
    results: Dict = {"facts": facts, "small": a.small, "pack": {}, "loaders": {}}
    only = set(a.only.split(",")) if a.only else None
    failed = False
    for shape in shapes(a.small).values():
        # Ten formats of the plaintext (Fernet's base64 adds a third): fail early, not midway.
        need, free = 11 * shape.total_bytes, shutil.disk_usage(a.data).free
        if free < need:
            print(f"compare: {shape.name} needs ~{need / 2**30:.1f} GiB free under {a.data}, "
                  f"only {free / 2**30:.1f} GiB left", file=sys.stderr)
            return 1
        prepared: Dict[str, Optional[str]] = {}  # step -> None if ready, else why not
        for step, package in PREP_STEPS.items():
            if only and step != "plain" and (step in PACK_ONLY or
                                             not any(n in only and st == step for n, _, st, _ in LOADERS)):
                prepared[step] = "not selected by --only"
                continue
            why = install_status(a.venv, package)
            if why is None:
                print(f"[{shape.name}] prepare {step} ...", flush=True)
                r = measure([sys.executable, os.path.join(HERE, "prepare.py"), step, shape.name, a.data, *small],
                            timeout, os.path.join(logs, f"prep-{shape.name}-{step}.log"))
                if "error" in r:
                    why, failed = f"not run: preparing {step} failed: {r['error']}", True
                    print(f"  FAILED: {r['error']}", flush=True)
                elif "seconds" in r:
                    results["pack"].setdefault(step, {})[shape.name] = r
                    print(f"  {r['gb_per_s']:.3f} GB/s ({r['seconds']:.1f} s)", flush=True)
            prepared[step] = why
        for name, workers, step, encrypted in LOADERS:
            if only and name not in only:
                continue
            if a.small and workers and name != "torch-memmap":
                continue  # the smoke run checks each peer once; worker processes only cost time there
            key = f"{name} w{workers}" if not name.startswith("shardlock") else name
            if prepared[step] is not None:
                r = {"skipped": prepared[step]}
            else:
                print(f"[{shape.name}] {key} ...", flush=True)
                cmd = [sys.executable, os.path.join(HERE, "peers.py"), name, shape.name, a.data,
                       "--workers", str(workers), *small]
                r = measure(cmd, timeout, os.path.join(logs, f"{shape.name}-{key.replace(' ', '-')}.log"))
            r.update(loader=name, workers=workers, encrypted=encrypted)
            errors = [e for ep in r.get("epochs", []) for e in ep["errors"]]
            if "error" in r or errors:
                failed = True
                print(f"  FAILED: {r.get('error') or errors}", flush=True)
            elif "epochs" in r:
                print("  " + ", ".join(f"epoch {i + 1}: {e['gb_per_s']:.2f} GB/s" for i, e in enumerate(r["epochs"])),
                      flush=True)
            else:
                print(f"  skipped: {r['skipped']}", flush=True)
            results["loaders"].setdefault(shape.name, {})[key] = r
        if not a.keep:  # one shape's formats at a time on disk: ~10 GiB instead of ~20
            shutil.rmtree(os.path.join(a.data, shape.name), ignore_errors=True)
    results["facts"]["run_seconds"] = time.time() - started
    results["facts"]["loadavg_end"] = os.getloadavg()
    with open(os.path.join(a.out, "compare.json"), "w") as f:
        json.dump(results, f, indent=1)
    render(results, a.out)
    if not a.keep:
        shutil.rmtree(a.data, ignore_errors=True)
    print(f"compare: {'FAILED' if failed else 'all runs passed their spot checks'} "
          f"in {time.time() - started:.0f} s; results in {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
