"""The comparison's outputs: machine facts, the Markdown tables (with the ratios against
the goals of issue 7) and the bar chart."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from typing import Dict, List, Optional, Tuple

from common import Shape

PACKAGES = ["shardlock", "torch", "numpy", "cryptography", "litdata", "mosaicml-streaming", "matplotlib"]


def machine_facts(venv: str) -> Dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                          text=True).stdout.strip():
            commit += " plus uncommitted changes"
    except OSError:
        commit = "?"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": os.cpu_count(), "memory_gib": round(mem, 1), "kernel": platform.release(),
            "python": platform.python_version(), "versions": versions, "commit": commit,
            "loadavg_start": os.getloadavg()}


def _ep(r: Dict, i: int, key: str) -> Optional[float]:
    eps = r.get("epochs") or []
    return eps[i][key] if len(eps) > i else None


def _label(key: str) -> str:
    return key.replace(" w", ", workers ")


def _check(r: Dict) -> str:
    if "skipped" in r:
        why = r["skipped"]
        return (why if why.startswith("not run") else "skipped: " + why)[:200]
    if "error" in r:
        return "ERROR: " + r["error"][:200]
    errors = [e for ep in r["epochs"] for e in ep["errors"]]
    if errors:
        return "MISMATCH: " + "; ".join(errors)[:160]
    rows = sum(ep["compared_rows"] for ep in r["epochs"])
    shuffled = all(ep["shuffled"] for ep in r["epochs"])
    return f"ok ({rows} rows equal, every sample once{', shuffled' if shuffled else ', NOT shuffled'})"


def loader_table(rows: Dict[str, Dict]) -> List[str]:
    out = ["| loader | encrypted | epoch 1 GB/s | epoch 2 GB/s | epoch 2 samples/s | CPU s (epoch 1 + 2) "
           "| peak RSS MiB (anon) | first batch s | spot check |",
           "|---|---|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        enc = "yes" if r["encrypted"] else "no"
        if "epochs" not in r:
            out.append(f"| {_label(key)} | {enc} | | | | | | | {_check(r)} |")
            continue
        cpu = sum(ep["cpu_s"] for ep in r["epochs"])
        out.append(f"| {_label(key)} | {enc} | {_ep(r, 0, 'gb_per_s'):.2f} | {_ep(r, 1, 'gb_per_s'):.2f} "
                   f"| {_ep(r, 1, 'samples_per_s'):,.0f} | {cpu:.1f} "
                   f"| {r['peak_rss_mib']:,.0f} ({r['peak_anon_mib']:,.0f}) | {_ep(r, 0, 'first_batch_s'):.2f} "
                   f"| {_check(r)} |")
    return out


def best(rows: Dict[str, Dict], loader: str) -> Tuple[Optional[float], str]:
    """The best epoch-2 GB/s over a loader's worker settings, and which one."""
    cands = [(_ep(r, 1, "gb_per_s"), k) for k, r in rows.items() if r["loader"] == loader and "epochs" in r]
    return max(cands) if cands else (None, "")


def goals(results: Dict) -> List[str]:
    """Epoch-2 ratios of shardlock (window shuffle, its default) against issue 7's goals."""
    out = ["| goal (issue 7) | tokens (8 KiB) | images (147 KiB) |", "|---|---|---|"]
    for peer, target, text in [("torch-memmap", None, "vs best torch DataLoader over memmap"),
                               ("litdata-fernet", 20.0, "vs best litdata FernetEncryption (chunk)"),
                               ("handrolled", 5.0, "vs best hand-rolled AES-GCM Dataset")]:
        cells = []
        for shape in ("tokens", "images"):
            rows = results["loaders"].get(shape, {})
            ours, _ = best(rows, "shardlock-window")
            glob, _ = best(rows, "shardlock-global")
            theirs, which = best(rows, peer)
            goal = target if target is not None else (2.0 if shape == "tokens" else 1.0)
            if ours is None or theirs is None:
                cells.append("not measured")
                continue
            ratio = ours / theirs
            cells.append(f"{ratio:.2f}x (goal {goal:g}x: {'met' if ratio >= goal else 'MISSED'}; "
                         f"global shuffle {glob / theirs:.2f}x; peer: {_label(which)})" if glob else f"{ratio:.2f}x")
        out.append(f"| shardlock {text} | " + " | ".join(cells) + " |")
    pack = results.get("pack", {})
    cells = []
    for shape in ("tokens", "images"):
        ours, theirs = pack.get("shardlock", {}).get(shape), pack.get("litdata-fernet", {}).get(shape)
        if ours and theirs:
            ratio = ours["gb_per_s"] / theirs["gb_per_s"]
            cells.append(f"{ratio:.2f}x (goal 3x: {'met' if ratio >= 3 else 'MISSED'})")
        else:
            cells.append("not measured")
    out.append("| shardlock pack vs litdata optimize() with FernetEncryption | " + " | ".join(cells) + " |")
    # The pack goal (issue #17): >= 0.8 of the disk's sequential write rate, from .npy and from Parquet.
    for step, text in (("shardlock", "pack from .npy"), ("shardlock-parquet", "pack from Parquet")):
        cells = []
        for shape in ("tokens", "images"):
            ours, disk = pack.get(step, {}).get(shape), pack.get("disk", {}).get(shape)
            if ours and disk:
                ratio = ours["gb_per_s"] / disk["gb_per_s"]
                cells.append(f"{ratio:.2f} of the disk's write rate (goal 0.8: {'met' if ratio >= 0.8 else 'MISSED'})")
            else:
                cells.append("not measured")
        out.append(f"| shardlock {text} | " + " | ".join(cells) + " |")
    return out


def pack_table(results: Dict) -> List[str]:
    names = {"disk": "disk: sequential write + fsync (the reference)",
             "shardlock": "shardlock pack (CLI) from .npy, sealing on every core",
             "litdata": "litdata optimize(), plaintext, 2 workers",
             "litdata-fernet": "litdata optimize(), FernetEncryption chunk, 2 workers",
             "handrolled": "hand-rolled AES-GCM (cryptography), 1 thread", "mds": "Mosaic MDSWriter, plaintext",
             "shardlock-parquet": "shardlock.pack from Parquet",
             "litdata-parquet": "litdata optimize() from Parquet, plaintext, 2 workers",
             "mds-parquet": "Mosaic MDSWriter from Parquet, plaintext"}
    out = ["| packer | tokens GB/s (s) | images GB/s (s) |", "|---|---|---|"]
    for step, text in names.items():
        per = results["pack"].get(step)
        if not per:
            continue
        cells = [f"{per[s]['gb_per_s']:.3f} ({per[s]['seconds']:.1f})" if s in per else "" for s in ("tokens", "images")]
        out.append(f"| {text} | " + " | ".join(cells) + " |")
    return out


def markdown(results: Dict, shapes: Dict[str, Shape]) -> str:
    f = results["facts"]
    v = ", ".join(f"{k} {val}" for k, val in f["versions"].items())
    cmd = "make compare SMALL=1" if results["small"] else "make compare"
    lines = [
        f"# shardlock vs the loaders users run today{' (SMALL smoke run)' if results['small'] else ''}",
        "",
        f"`{cmd}` on {f['date']} at commit {f['commit']}: {f['cpu']}, {f['cores']} cores, "
        f"{f['memory_gib']} GiB RAM, Linux {f['kernel']}, Python {f['python']}; {v}. "
        f"Load average {f['loadavg_start'][0]:.1f} at the start and {f['loadavg_end'][0]:.1f} at the end "
        f"(a shared machine); the whole run took {f['run_seconds'] / 60:.1f} min.",
        "",
        "Every loader reads the same random uint8 plaintext, shuffle on, two epochs one after the other in its "
        "own process (epoch 2: page cache warm). GB/s and samples/s count the bytes of the batches yielded; "
        "CPU s include reaped DataLoader workers; peak RSS is summed over the process tree, sampled every "
        "50 ms, and counts the page cache pages each loader maps (anon: its own memory). The spot check "
        "reads each sample's index from its first 8 bytes, requires every sample exactly once, and compares "
        "4 rows of ~50 batches per epoch with the plaintext byte for byte. shardlock: `shardlock.Loader` (CPU "
        "tensors) with its default decrypt workers, token check per shard, window or global shuffle.",
        "",
    ]
    for name, rows in results["loaders"].items():
        s = shapes[name]
        lines += [f"## {name}: {s.count:,} samples of {'x'.join(map(str, s.dims))} uint8 "
                  f"({s.total_bytes / 2**30:.2f} GiB), batch {s.batch}", ""]
        lines += loader_table(rows) + [""]
    lines += ["## Pack (encrypt) throughput, plaintext GB/s (seconds)", ""] + pack_table(results) + [""]
    lines += ["## Ratios (epoch 2 GB/s)", ""] + goals(results) + [""]
    return "\n".join(lines)


def chart(results: Dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("compare: matplotlib missing, no chart")
        return
    shapes_ = list(results["loaders"])
    fig, axes = plt.subplots(1, len(shapes_), figsize=(6.5 * len(shapes_), 5.5), squeeze=False)
    for ax, name in zip(axes[0], shapes_):
        rows = [(k, r) for k, r in results["loaders"][name].items() if "epochs" in r]
        labels = [_label(k) for k, _ in rows]
        vals = [_ep(r, 1, "gb_per_s") for _, r in rows]
        colors = ["#1f5fa8" if k.startswith("shardlock") else ("#d0703c" if r["encrypted"] else "#9a9a9a")
                  for k, r in rows]
        ax.barh(labels[::-1], vals[::-1], color=colors[::-1])
        for y, val in enumerate(vals[::-1]):
            ax.text(val, y, f" {val:.2f}", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("GB/s of batches yielded, epoch 2 (log scale)")
        ax.set_title(name)
    f = results["facts"]
    fig.suptitle(f"shardlock (blue) vs encrypted (orange) and plaintext (grey) peers; {f['cpu']}, "
                 f"{f['cores']} cores, {f['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
