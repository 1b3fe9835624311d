"""Images decoded on the decrypt workers (``Loader(decode={...: shardlock.Image(...)})``):
pixels against PIL + torchvision, determinism of the train transforms, bad input."""

import io
import json
import struct
import zlib

import numpy as np
import pytest

import shardlock

PIL = pytest.importorskip("PIL")
from PIL import Image as PILImage, ImageOps  # noqa: E402

v2 = pytest.importorskip("torchvision.transforms.v2")
import torch  # noqa: E402


def photo(w: int, h: int, seed: int) -> np.ndarray:
    """A photo-like RGB image: smooth shapes, edges and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 128 + 100 * np.sin(x / (17 + seed)) * np.cos(y / 23)
    g = 128 + 90 * np.sin((x + 2 * y) / 41)
    b = np.where((x - w / 2) ** 2 + (y - h / 3) ** 2 < (min(w, h) / 4) ** 2, 220, 40).astype(np.float32)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: "PILImage.Image", fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def corpus():
    """(name, encoded bytes): JPEG sizes and subsamplings, progressive, gray, CMYK, EXIF
    rotation, PNG RGB/RGBA/gray/palette, WebP lossy and lossless."""
    out = []
    for i, (w, h, sub) in enumerate([(500, 375, 2), (375, 500, 0), (640, 427, 1), (160, 120, 2), (1024, 683, 2)]):
        out.append((f"jpeg-{w}x{h}-sub{sub}", encode(PILImage.fromarray(photo(w, h, i)), "JPEG", quality=90, subsampling=sub)))
    rgb = PILImage.fromarray(photo(480, 360, 7))
    out.append(("jpeg-progressive", encode(rgb, "JPEG", quality=90, progressive=True)))
    out.append(("jpeg-gray", encode(rgb.convert("L"), "JPEG", quality=90)))
    out.append(("jpeg-cmyk", encode(rgb.convert("CMYK"), "JPEG", quality=95)))
    exif = PILImage.Exif()
    exif[0x0112] = 6
    out.append(("jpeg-exif-rotated", encode(rgb, "JPEG", quality=90, exif=exif.tobytes())))
    out.append(("png-rgb", encode(rgb, "PNG")))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(PILImage.fromarray((np.arange(480 * 360) % 255).reshape(360, 480).astype(np.uint8)))
    out.append(("png-rgba", encode(rgba, "PNG")))
    out.append(("png-gray", encode(rgb.convert("L"), "PNG")))
    out.append(("png-palette", encode(rgb.convert("P", palette=PILImage.Palette.ADAPTIVE), "PNG")))
    out.append(("webp-lossy", encode(rgb, "WEBP", quality=90)))
    out.append(("webp-lossless", encode(rgb, "WEBP", lossless=True)))
    return out


def reference_eval(data: bytes, size: int = 224, resize: int = 256) -> np.ndarray:
    """torchvision's ImageNet eval on a PIL-decoded image (EXIF orientation applied)."""
    img = ImageOps.exif_transpose(PILImage.open(io.BytesIO(data))).convert("RGB")
    t = v2.Compose([v2.Resize(resize), v2.CenterCrop(size), v2.PILToTensor()])
    return t(img).numpy()


def pack_images(env, name, values, labels=None):
    out = env.root / name
    with shardlock.Writer(out, keyring=env.keyring, issuer_key=env.issuer, dataset_id=name,
                          schema={"image": "bytes", "label": ("i64", ())}, shard_size=1 << 18) as w:
        for i, v in enumerate(values):
            w.write({"image": v, "label": np.int64(i if labels is None else labels[i])})
    return out


def read_all(loader):
    images, labels = [], []
    for b in loader:
        images.append(b["image"].numpy().copy())
        labels.append(b["label"].numpy().copy())
    return (np.concatenate(images), np.concatenate(labels)) if images else (np.zeros((0,)), np.zeros((0,)))


def test_eval_decode_matches_pil_and_torchvision_within_two_levels(env):
    items = corpus()
    path = pack_images(env, "corpus", [b for _, b in items])
    loader = env.loader(path, batch_size=4, shuffle="none", drop_last=False, decode={"image": shardlock.Image(224)})
    images, labels = read_all(loader)
    assert images.shape == (len(items), 3, 224, 224) and images.dtype == np.uint8
    for (name, data), img, label in zip(items, images, labels):
        want = reference_eval(data)
        mae = np.abs(img.astype(np.int32) - want.astype(np.int32)).mean(axis=(1, 2))
        assert (mae <= 2.0).all(), f"{name} (sample {label}): mean absolute error per channel {mae}"


def test_layout_dtype_and_normalize_follow_torchvision(env):
    data = encode(PILImage.fromarray(photo(500, 375, 3)), "JPEG", quality=90)
    path = pack_images(env, "one", [data] * 2)
    u8 = read_all(env.loader(path, batch_size=2, decode={"image": shardlock.Image(224)}))[0][0]
    spec = shardlock.Image(224, layout="HWC", dtype="float32", mean=shardlock.IMAGENET_MEAN, std=shardlock.IMAGENET_STD)
    f32 = read_all(env.loader(path, batch_size=2, decode={"image": spec}))[0][0]
    assert f32.shape == (224, 224, 3) and f32.dtype == np.float32
    mean, std = np.array(shardlock.IMAGENET_MEAN), np.array(shardlock.IMAGENET_STD)
    want = (u8.transpose(1, 2, 0) / 255.0 - mean) / std
    np.testing.assert_allclose(f32, want, atol=1e-5)
    bf = env.loader(path, batch_size=2, decode={"image": shardlock.Image(96, dtype=torch.bfloat16)})
    b = next(iter(bf))["image"]
    assert b.dtype == torch.bfloat16 and tuple(b.shape) == (2, 3, 96, 96)
    assert 0.0 <= float(b.float().min()) and float(b.float().max()) <= 1.0
    with pytest.raises(ValueError, match="normalize needs a float dtype"):
        env.loader(path, batch_size=2, decode={"image": shardlock.Image(224, mean=(0, 0, 0), std=(1, 1, 1))})
    with pytest.raises(ValueError, match="not among the loader's fields"):
        env.loader(path, batch_size=2, fields=["label"], decode={"image": shardlock.Image(224)})
    with pytest.raises(ValueError, match="holds tensor values"):
        env.loader(path, batch_size=2, decode={"label": shardlock.Image(224)})


def test_train_transforms_are_a_function_of_seed_epoch_and_sample(env):
    values = [encode(PILImage.fromarray(photo(320 + 8 * i, 240, i)), "JPEG", quality=90) for i in range(24)]
    path = pack_images(env, "train", values)
    spec = {"image": shardlock.Image(64, train=True)}

    def epoch_images(workers, seed=3, epoch=0, shuffle="window"):
        loader = env.loader(path, batch_size=4, seed=seed, workers=workers, shuffle=shuffle, decode=spec)
        loader.set_epoch(epoch)
        imgs, labels = read_all(loader)
        return {int(l): im for l, im in zip(labels, imgs)}

    one = epoch_images(1)
    assert sorted(one) == list(range(24))
    two = epoch_images(2, shuffle="global")
    assert all(np.array_equal(one[k], two[k]) for k in one), "same pixels whatever the worker count and order"
    other_epoch = epoch_images(1, epoch=1)
    other_seed = epoch_images(1, seed=4)
    assert sum(not np.array_equal(one[k], other_epoch[k]) for k in one) >= 20
    assert sum(not np.array_equal(one[k], other_seed[k]) for k in one) >= 20
    # Flips happen: some images equal the mirror of a crop of the same box in another epoch is
    # hard to assert; instead the crops differ in content across epochs and stay in range.
    assert all(im.shape == (3, 64, 64) for im in one.values())

    # Resume mid-epoch: the rest of the epoch has the same pixels.
    loader = env.loader(path, batch_size=4, seed=3, workers=1, decode=spec)
    it = iter(loader)
    first = [next(it) for _ in range(2)]
    state = loader.state_dict()
    seen = {int(l) for b in first for l in b["label"]}
    resumed = env.loader(path, batch_size=4, seed=3, workers=2, decode=spec)
    resumed.load_state_dict(state)
    rest, labels = read_all(resumed)
    assert {int(l) for l in labels} == set(range(24)) - seen
    for im, l in zip(rest, labels):
        assert np.array_equal(im, one[int(l)])


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (valid CRC) and holds almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_inputs():
    good = encode(PILImage.fromarray(photo(200, 150, 1)), "JPEG", quality=90)
    return [
        ("truncated", good[: len(good) // 3]),
        ("garbage after the signature", b"\xff\xd8\xff" + bytes(range(256)) * 4),
        ("wrong magic", b"GIF89a" + b"\0" * 100),
        ("empty", b""),
        ("bomb", png_bomb(100_000, 100_000)),
        ("truncated png", encode(PILImage.fromarray(photo(64, 64, 2)), "PNG")[:200]),
    ]


@pytest.mark.parametrize("case", range(6))
def test_bad_images_raise_decode_error_naming_shard_record_and_field(env, case):
    good = encode(PILImage.fromarray(photo(200, 150, 1)), "JPEG", quality=90)
    name, bad = bad_inputs()[case]
    path = pack_images(env, "bad", [good, good, bad, good])
    loader = env.loader(path, batch_size=4, shuffle="none", decode={"image": shardlock.Image(64)})
    with pytest.raises(shardlock.DecodeError) as e:
        next(iter(loader))
    assert e.value.record == 2 and e.value.field == "image" and e.value.shard == 0, name
    assert "record 2" in str(e.value) and "image" in str(e.value)
    if name == "bomb":
        assert "max_pixels" in str(e.value)


def test_skip_leaves_bad_images_out_audited_and_counted(env):
    good = [encode(PILImage.fromarray(photo(200, 150, i)), "JPEG", quality=90) for i in range(10)]
    values = list(good)
    for k, (_, bad) in zip((1, 4, 7), bad_inputs()):
        values[k] = bad
    path = pack_images(env, "skips", values)
    audit = env.root / "audit.jsonl"
    loader = env.loader(path, batch_size=4, shuffle="none", drop_last=False, decode={"image": shardlock.Image(64)},
                        on_decode_error="skip", audit_log=audit)
    images, labels = read_all(loader)
    assert sorted(int(x) for x in labels) == [0, 2, 3, 5, 6, 8, 9]
    assert loader.decode_skips == 3
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    skipped = [e for e in events if e.get("event") == "decode_skipped"]
    assert len(skipped) == 3 and all("field \"image\"" in e["detail"] for e in skipped)
    with pytest.raises(ValueError, match="on_decode_error"):
        env.loader(path, batch_size=4, decode={"image": shardlock.Image(64)}, on_decode_error="ignore")


def test_sixteen_bit_png_keeps_its_high_byte(env):
    rng = np.random.default_rng(9)
    # A smooth 16-bit gray ramp with noise in the low byte.
    y, x = np.mgrid[0:150, 0:200]
    deep = ((x * 300 + y * 37) % 65536).astype(np.uint16) | rng.integers(0, 256, (150, 200)).astype(np.uint16)
    data = encode(PILImage.fromarray(deep), "PNG")  # uint16 -> mode I;16, a 16-bit gray PNG
    assert data[24] == 16, "IHDR bit depth"
    path = pack_images(env, "deep", [data])
    got = read_all(env.loader(path, batch_size=1, decode={"image": shardlock.Image(96, resize=128)}))[0][0]
    eight = PILImage.fromarray((deep >> 8).astype(np.uint8), mode="L").convert("RGB")
    want = v2.Compose([v2.Resize(128), v2.CenterCrop(96), v2.PILToTensor()])(eight).numpy()
    mae = np.abs(got.astype(np.int32) - want.astype(np.int32)).mean()
    assert mae <= 1.0, mae


def test_decode_through_a_dataloader_with_workers(env):
    torch_mod = pytest.importorskip("shardlock.torch")
    values = [encode(PILImage.fromarray(photo(200, 150, i)), "JPEG", quality=90) for i in range(16)]
    path = pack_images(env, "dl", values)
    ds = torch_mod.IterableDataset(path, keyring=env.keyring, token=env.token("dl"), trust=env.trust, batch_size=4,
                                   shuffle="none", decode={"image": shardlock.Image(32, dtype="float32")})
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    labels = []
    for b in dl:
        assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.float32
        labels += b["label"].tolist()
    assert sorted(labels) == list(range(16))


def test_images_with_many_metadata_chunks_decode_without_exhausting_the_arena(env):
    """Hundreds of small allocations that outlive the arena's first region (PNG text
    chunks, JPEG APP segments the decoder keeps) go to overflow chunks, not an abort."""
    from PIL import PngImagePlugin

    rgb = PILImage.fromarray(photo(120, 90, 4))
    info = PngImagePlugin.PngInfo()
    for k in range(400):
        info.add_text(f"k{k}", "v" * 300)
        info.add_itxt(f"i{k}", "w" * 300, zip=True)
    png = encode(rgb, "PNG", pnginfo=info)
    jpeg = encode(rgb, "JPEG", quality=90)
    # 200 APP2 segments inserted after SOI (1 KB each: ICC-like payloads the decoder stores).
    seg = b"\xff\xe2" + (2 + 1024).to_bytes(2, "big") + b"ICC_PROFILE\0" + bytes(1024 - 12)
    jpeg_app = jpeg[:2] + seg * 200 + jpeg[2:]
    path = pack_images(env, "meta", [png, jpeg_app])
    images, labels = read_all(env.loader(path, batch_size=2, shuffle="none", decode={"image": shardlock.Image(64)}))
    assert images.shape == (2, 3, 64, 64)
    for data, img in zip((png, jpeg), images):
        want = reference_eval(data, size=64, resize=73)
        assert np.abs(img.astype(np.int32) - want.astype(np.int32)).mean() <= 2.0


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine (run scripts/gpu-check on one)")


def test_decode_on_the_device_is_checked_before_any_device(env):
    path = pack_images(env, "dev-args", [encode(PILImage.fromarray(photo(64, 48, 1)), "PNG")] * 3)
    image = {"image": shardlock.Image(32)}
    with pytest.raises(ValueError, match="decode_on='gpu'|decode_on=\"gpu\""):
        env.loader(path, batch_size=2, decode=image, decode_on="gpu", device="cuda:0")
    with pytest.raises(ValueError, match="device=\"cuda:N\""):
        env.loader(path, batch_size=2, decode=image, decode_on="device")
    with pytest.raises(ValueError, match="on_decode_error=\"skip\""):
        env.loader(path, batch_size=2, decode=image, decode_on="device", device="cuda:0", on_decode_error="skip")
    with pytest.raises(ValueError, match="tensor values"):
        env.loader(path, batch_size=2, decode={"label": shardlock.Image(32)}, decode_on="device", device="cuda:0")
    if not torch.cuda.is_available():
        with pytest.raises(shardlock.DeviceUnavailable, match="cuda:0"):
            env.loader(path, batch_size=2, decode=image, decode_on="device", device="cuda:0")


def _device_and_workers(env, path, image, **kw):
    """Every batch's images decoded on the workers and on the device (same order)."""
    args = dict(batch_size=4, shuffle="global", seed=9, drop_last=False, decode={"image": image}, **kw)
    host, _ = read_all(env.loader(path, **args))
    dev = [b["image"].cpu().numpy() for b in env.loader(path, device="cuda:0", decode_on="device", **args)]
    return host, np.concatenate(dev)


@needs_gpu
def test_decode_on_the_device_matches_the_workers(env):
    """Images nvJPEG does not take (PNG, WebP, gray, CMYK, EXIF-rotated) decode on the
    host and come out bit for bit as on the workers; three-component JPEGs decoded by
    nvJPEG differ only by the decoders' IDCT and upsampling: within 2 levels (MAE) of
    the workers and of torchvision."""
    items = corpus()
    path = pack_images(env, "dev-corpus", [b for _, b in items])
    host, dev = _device_and_workers(env, path, shardlock.Image(224), shuffle="none")
    assert dev.shape == host.shape == (len(items), 3, 224, 224) and dev.dtype == np.uint8
    for (name, data), h, d in zip(items, host, dev):
        mae = np.abs(h.astype(np.int32) - d.astype(np.int32)).mean(axis=(1, 2))
        nvjpeg = name.startswith("jpeg") and name not in ("jpeg-gray", "jpeg-cmyk", "jpeg-exif-rotated")
        if nvjpeg:
            assert (mae <= 2.0).all(), f"{name}: device vs workers MAE {mae}"
            ref = np.abs(d.astype(np.int32) - reference_eval(data).astype(np.int32)).mean(axis=(1, 2))
            assert (ref <= 2.0).all(), f"{name}: device vs torchvision MAE {ref}"
        else:
            assert np.array_equal(h, d), f"{name}: host-decoded pixels differ (MAE {mae})"


@needs_gpu
def test_train_transforms_on_the_device_are_the_workers_transforms(env):
    """Same crops and flips as on the workers (a pure function of seed, epoch and
    sample): PNGs give identical normalized float16 tensors."""
    values = [encode(PILImage.fromarray(photo(200 + 8 * i, 150, i)), "PNG") for i in range(10)]
    path = pack_images(env, "dev-train", values)
    image = shardlock.Image(64, train=True, dtype="float16", mean=shardlock.IMAGENET_MEAN, std=shardlock.IMAGENET_STD)
    host, dev = _device_and_workers(env, path, image)
    assert dev.dtype == np.float16 and np.array_equal(host, dev)
