"""JPEG decode and the ImageNet transforms, side by side in one run: shardlock decoding
on its decrypt workers (encrypted shards) against torchvision's `ImageFolder` + PIL +
`transforms.v2` in a torch `DataLoader` (plaintext files), workers 0, 1 and 2, and
DALI's CPU pipeline (`nvidia-dali-cuda130`, `device_id=None`, one thread per core) over
the same files when it is installed.

    python benches/decode.py DATA_DIR [--small] [--json OUT]

The images are generated (nothing is downloaded): ImageNet-like 500x375 photos (smooth
shapes, edges, texture and sensor noise), JPEG quality 90 4:2:0, in 10 class folders.
Both pipelines deliver `[64, 3, 224, 224]` batches:
- train: RandomResizedCrop(224) + RandomHorizontalFlip + Normalize (ImageNet), float32;
- eval: Resize(256) + CenterCrop(224) + Normalize, float32.
Reported: images per second over the second pass (the first warms the page cache),
median of the passes after the first.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time

import numpy as np

BATCH = 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(rng, w=500, h=375):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(8, 40, 6)
    img = np.stack([
        128 + 90 * np.sin(x / f[0] + y / f[1]),
        128 + 80 * np.cos(x / f[2]) * np.sin(y / f[3]),
        128 + 70 * np.sin((x - y) / f[4]),
    ], axis=-1)
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(30, 150)
    img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 14, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_folder(root: str, n: int) -> float:
    from PIL import Image

    rng = np.random.default_rng(11)
    total = 0
    for i in range(n):
        d = os.path.join(root, f"class{i % 10:02d}")
        os.makedirs(d, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(photo(rng)).save(buf, format="JPEG", quality=90, subsampling=2)
        with open(os.path.join(d, f"{i:06d}.jpg"), "wb") as f:
            f.write(buf.getvalue())
        total += buf.tell()
    return total / n


def rate(make_iter, passes: int) -> list:
    rates = []
    for _ in range(passes):
        t0, n = time.perf_counter(), 0
        for batch in make_iter():
            n += len(batch[1] if isinstance(batch, (tuple, list)) else batch["label"])
        rates.append(n / (time.perf_counter() - t0))
    return rates


def dali_rates(folder: str, train: bool, threads: int, passes: int):
    """Images/s of DALI's CPU pipeline per pass (None when DALI is not installed)."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        return None
    mean, std = [m * 255 for m in MEAN], [s * 255 for s in STD]

    @pipeline_def(batch_size=BATCH, num_threads=threads, device_id=None)
    def pipe():
        jpegs, labels = fn.readers.file(file_root=folder, random_shuffle=True, name="Reader")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        if train:
            images = fn.random_resized_crop(images, size=224)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std,
                                              mirror=fn.random.coin_flip())
        else:
            images = fn.resize(images, resize_shorter=256)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=(224, 224),
                                              mean=mean, std=std)
        return images, labels

    p = pipe()
    p.build()
    n = p.epoch_size("Reader")
    rates = []
    for _ in range(passes):
        t0, done = time.perf_counter(), 0
        while done < n:
            _, labels = p.run()
            done += len(labels)
        rates.append(done / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--small", action="store_true", help="256 images instead of 2,048")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch
    import torchvision
    from torchvision.transforms import v2

    import shardlock

    n = 256 if args.small else 2048
    folder = os.path.join(args.data, "folder")
    enc = os.path.join(args.data, "encrypted")
    os.makedirs(args.data, exist_ok=True)
    keyring, issuer = os.path.join(args.data, "keyring.json"), os.path.join(args.data, "issuer.key")
    if not os.path.exists(os.path.join(folder, ".done")):
        avg = make_folder(folder, n)
        open(os.path.join(folder, ".done"), "w").write(f"{avg}")
    avg = float(open(os.path.join(folder, ".done")).read())
    if not os.path.exists(keyring):
        shardlock.create_keyring(keyring)
        shardlock.create_issuer_key(issuer)
    trust = issuer + ".pub"
    if not os.path.exists(os.path.join(enc, "manifest.json")):
        shardlock.pack(folder, enc, keyring=keyring, issuer_key=issuer, dataset_id="jpegs", shard_size="64MiB",
                       force=True, progress=False)
    token = os.path.join(args.data, "job.token")
    shardlock.issue_token(issuer, token, dataset="jpegs", principal="bench")
    cores = os.cpu_count() or 1
    print(f"{n} JPEGs, {avg / 1e3:.1f} KB average, 500x375 q90; {cores} cores; torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}", flush=True)

    results = {"images": n, "avg_bytes": avg, "cores": cores, "rows": []}
    for mode in ("train", "eval"):
        spec = shardlock.Image(224, train=(mode == "train"), dtype="float32", mean=MEAN, std=STD)
        loader = shardlock.Loader(enc, keyring=keyring, token=token, trust=trust, batch_size=BATCH,
                                  shuffle="window", drop_last=False, decode={"image": spec})
        r = rate(lambda: iter(loader), args.passes)
        row = {"loader": "shardlock (encrypted, decode on workers)", "mode": mode, "workers": cores,
               "images_per_s": statistics.median(r[1:])}
        results["rows"].append(row)
        print(f"{mode:5s}  shardlock, {cores} decrypt workers: {row['images_per_s']:8.1f} images/s", flush=True)
        if mode == "train":
            t = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
        else:
            t = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.PILToTensor(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
        ds = torchvision.datasets.ImageFolder(folder, transform=t)
        for w in (0, 1, 2):
            dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=w,
                                             persistent_workers=w > 0)
            r = rate(lambda: iter(dl), args.passes)
            row = {"loader": "torchvision ImageFolder + PIL (plaintext)", "mode": mode, "workers": w,
                   "images_per_s": statistics.median(r[1:])}
            results["rows"].append(row)
            print(f"{mode:5s}  torchvision, DataLoader workers={w}: {row['images_per_s']:8.1f} images/s", flush=True)
            del dl
        r = dali_rates(folder, mode == "train", cores, args.passes)
        if r is None:
            print(f"{mode:5s}  DALI CPU: skipped (nvidia-dali is not installed)", flush=True)
        else:
            row = {"loader": "DALI CPU pipeline (plaintext)", "mode": mode, "workers": cores,
                   "images_per_s": statistics.median(r[1:])}
            results["rows"].append(row)
            print(f"{mode:5s}  DALI CPU, {cores} threads:        {row['images_per_s']:8.1f} images/s", flush=True)
    for mode in ("train", "eval"):
        ours = next(r["images_per_s"] for r in results["rows"] if r["mode"] == mode and r["loader"].startswith("shardlock"))
        best = max(r["images_per_s"] for r in results["rows"] if r["mode"] == mode and r["loader"].startswith("torchvision"))
        print(f"{mode:5s}  shardlock / best torchvision: {ours / best:.2f}x")
        results[f"{mode}_ratio"] = ours / best
        dali = [r["images_per_s"] for r in results["rows"] if r["mode"] == mode and r["loader"].startswith("DALI")]
        if dali:
            print(f"{mode:5s}  shardlock / DALI CPU: {ours / dali[0]:.2f}x")
            results[f"{mode}_ratio_dali"] = ours / dali[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return None


if __name__ == "__main__":
    sys.exit(main())
