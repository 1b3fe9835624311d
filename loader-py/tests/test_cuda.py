"""device="cuda:N": CUDA tensors over the device stage's buffers, through DLPack.

Without a GPU the device tests skip with the reason; the typed error for a missing
device is checked everywhere.
"""

import numpy as np
import pytest
import torch

import shardlock

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine (run scripts/gpu-check on one)")


@pytest.fixture
def images(env):
    """300 samples: img = u8[8, 8, 3], tok = u16[16], w = bf16[2], tag = bytes."""
    rng = np.random.default_rng(5)
    n = 300
    img = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    tok = rng.integers(0, 65536, size=(n, 16), dtype=np.uint16)
    w = torch.arange(2 * n, dtype=torch.float32).reshape(n, 2).to(torch.bfloat16)
    path = env.root / "images"
    with shardlock.Writer(path, keyring=env.keyring, issuer_key=env.issuer, dataset_id="images", shard_size=8192) as wr:
        for i in range(n):
            wr.write({"img": img[i], "tok": tok[i], "w": w[i], "tag": f"img-{i}".encode() * (i % 4 + 1)})
    return path, img, tok


def test_a_missing_device_is_a_typed_error_naming_it(env, images):
    path, _, _ = images
    ordinal = torch.cuda.device_count() + 3 if torch.cuda.is_available() else 0
    with pytest.raises(shardlock.DeviceUnavailable) as e:
        env.loader(path, dataset="images", device=f"cuda:{ordinal}")
    assert f"cuda:{ordinal}" in str(e.value)
    assert e.value.device == f"cuda:{ordinal}"
    with pytest.raises(ValueError, match="cuda:N"):
        env.loader(path, dataset="images", device="gpu0")


@needs_gpu
@pytest.mark.parametrize("pinned", [True, False])
def test_cuda_tensors_equal_the_host_batches(env, images, pinned):
    path, img, tok = images
    cpu = env.loader(path, dataset="images", seed=3, sample_ids=True, drop_last=False)
    gpu = env.loader(path, dataset="images", seed=3, sample_ids=True, drop_last=False, device="cuda:0", pinned=pinned)
    n = 0
    for a, b in zip(cpu, gpu):
        assert b["img"].device.type == "cuda" and b["img"].dtype == torch.uint8
        assert b["w"].dtype == torch.bfloat16
        assert torch.equal(a["sample_id"], b["sample_id"])
        for k in ("img", "tok", "w"):
            assert torch.equal(a[k], b[k].cpu()), k
        assert torch.equal(a["tag"][0], b["tag"][0].cpu()) and torch.equal(a["tag"][1], b["tag"][1].cpu())
        ids = a["sample_id"].numpy()
        assert np.array_equal(b["img"].cpu().numpy(), img[ids])
        n += len(ids)
    assert n == 300


@needs_gpu
def test_tensors_held_across_later_batches_and_used_on_a_side_stream_keep_their_data(env, images):
    path, img, _ = images
    gpu = env.loader(path, dataset="images", seed=1, sample_ids=True, device="cuda:0")
    it = iter(gpu)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        first = next(it)
        checksum = first["img"].float().sum()
    kept = [next(it) for _ in range(20)]
    side.synchronize()
    ids = first["sample_id"].numpy()
    assert np.array_equal(first["img"].cpu().numpy(), img[ids])
    assert checksum.item() == float(img[ids].astype(np.float64).sum())
    for b in kept:
        assert np.array_equal(b["img"].cpu().numpy(), img[b["sample_id"].numpy()])


@needs_gpu
def test_raw_dlpack_exports_unconsumed_capsules_and_stream_minus_one(env, images):
    import gc

    path, img, _ = images
    gpu = env.loader(path, dataset="images", seed=2, sample_ids=True, device="cuda:0", shuffle="none")
    fields, ids = gpu._native.next_batch()
    dtype, dev = fields["img"]
    assert dtype == "u8" and dev.__dlpack_device__() == (2, 0)
    for _ in range(3):
        dev.__dlpack__()  # never consumed: the capsule's destructor releases it
    gc.collect()
    t = torch.utils.dlpack.from_dlpack(dev.__dlpack__(stream=-1))  # no wait: we order ourselves
    torch.cuda.synchronize()
    assert np.array_equal(t.cpu().numpy(), img[ids])
    with pytest.raises(ValueError, match="ambiguous"):
        dev.__dlpack__(stream=0)
    # Security review finding 9: an integer that is not a current stream of the device
    # never reaches the driver as a stream pointer.
    for bogus in (0x41414141, 2**62, -7):
        with pytest.raises(ValueError, match="cuda:0"):
            dev.__dlpack__(stream=bogus)
    side = torch.cuda.Stream()
    with pytest.raises(ValueError, match="not the current stream"):
        dev.__dlpack__(stream=side.cuda_stream)  # a live stream, but not the current one
    with torch.cuda.stream(side):
        t2 = torch.utils.dlpack.from_dlpack(dev.__dlpack__(stream=side.cuda_stream))
    torch.cuda.synchronize()
    assert np.array_equal(t2.cpu().numpy(), img[ids])
    del t, t2, dev, fields
    gc.collect()
    assert sum(1 for _ in gpu) > 0
