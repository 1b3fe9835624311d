"""The comparison's own checks must be able to fail: a wrong byte, a repeated or missing
sample, and a tampered hand-rolled chunk are each caught."""

import numpy as np
import pytest

from common import Shape, SpotCheck, write_plaintext

SHAPE = Shape("t", (64,), 100, 10)


@pytest.fixture
def plain(tmp_path):
    path = str(tmp_path / "x.npy")
    write_plaintext(path, SHAPE)
    return np.load(path, mmap_mode="r")


def epoch(plain, order, every=1):
    check = SpotCheck(plain, every=every, rows=SHAPE.batch)
    for lo in range(0, len(order), SHAPE.batch):
        check.batch(np.array(plain[order[lo : lo + SHAPE.batch]]))
    return check


def test_samples_carry_their_index(plain):
    assert [int(np.array(plain[i][:8]).view("<u8")[0]) for i in (0, 1, 99)] == [0, 1, 99]


def test_a_shuffled_epoch_passes(plain):
    s = epoch(plain, np.random.default_rng(1).permutation(SHAPE.count)).finish(SHAPE.count)
    assert s["errors"] == [] and s["shuffled"] and s["compared_rows"] == SHAPE.count


def test_a_wrong_byte_is_caught(plain):
    check = SpotCheck(plain, every=1, rows=SHAPE.batch)
    batch = np.array(plain[:10])
    batch[3, 40] ^= 1
    check.batch(batch)
    assert "row 3" in check.errors[0]


def test_repeated_and_missing_samples_are_caught(plain):
    order = np.arange(SHAPE.count)
    order[5] = 4
    errors = epoch(plain, order).finish(SHAPE.count)["errors"]
    assert any("duplicate" in e for e in errors)
    errors = epoch(plain, np.arange(90)).finish(SHAPE.count)["errors"]
    assert any("expected 100" in e for e in errors)


def test_unshuffled_is_reported(plain):
    assert not epoch(plain, np.arange(SHAPE.count)).finish(SHAPE.count)["shuffled"]


def test_handrolled_round_trip_and_tamper(plain, tmp_path):
    pytest.importorskip("cryptography")
    handrolled = pytest.importorskip("handrolled")
    from cryptography.exceptions import InvalidTag

    out = str(tmp_path / "hr")
    handrolled.write(plain, out)
    ds = handrolled.Dataset(out, SHAPE.count, SHAPE.dims)
    assert all(np.array_equal(ds[i].numpy(), plain[i]) for i in range(SHAPE.count))
    with open(f"{out}/chunks.bin", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(InvalidTag):
        handrolled.Dataset(out, SHAPE.count, SHAPE.dims)[0]
