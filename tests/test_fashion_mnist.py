"""Fashion-MNIST IDX reader: the real Debian files, and synthetic broken files that must fail naming the file."""
import gzip
import re

import numpy as np
import pytest

from scale_refiner.data.fashion_mnist import (CLASS_NAMES, DEFAULT_ROOT, IDXFormatError, load_fashion_mnist,
                                              read_idx_ubyte)

needs_package = pytest.mark.skipif(not DEFAULT_ROOT.is_dir(),
                                   reason="apt-get install dataset-fashion-mnist")


def idx_bytes(array: np.ndarray, magic_type: int = 0x08) -> bytes:
    """An IDX file as the format defines it, written independently of the reader under test."""
    header = bytes([0, 0, magic_type, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_gz(path, payload: bytes):
    with gzip.open(path, "wb") as f:
        f.write(payload)


def write_split(root, split_prefix, images, labels):
    write_gz(root / f"{split_prefix}-images-idx3-ubyte.gz", idx_bytes(images))
    write_gz(root / f"{split_prefix}-labels-idx1-ubyte.gz", idx_bytes(labels))


@needs_package
def test_train_split():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.int64
    assert len(CLASS_NAMES) == 10
    assert np.bincount(labels, minlength=10).tolist() == [6000] * 10
    assert images.flags.writeable
    # Real pixels, not a zero buffer: background black, garments bright.
    assert images.min() == 0 and images.max() == 255 and 50 < images.mean() < 100


@needs_package
def test_test_split():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10


def test_synthetic_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], dtype=np.uint8)
    write_split(tmp_path, "t10k", images, labels)
    got_images, got_labels = load_fashion_mnist("test", root=tmp_path)
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.dtype == np.int64 and got_labels.tolist() == labels.tolist()


def test_truncated_gz_names_the_file(tmp_path):
    write_split(tmp_path, "t10k", np.zeros((50, 28, 28), np.uint8), np.zeros(50, np.uint8))
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # cut mid-stream: gzip raises EOFError inside the reader
    with pytest.raises(IDXFormatError, match=re.escape(str(bad))):
        load_fashion_mnist("test", root=tmp_path)


def test_not_gzip_names_the_file(tmp_path):
    bad = tmp_path / "x.gz"
    bad.write_bytes(b"this is not gzip data at all")
    with pytest.raises(IDXFormatError, match=re.escape(str(bad))):
        read_idx_ubyte(bad, ndim=1)


def test_wrong_magic_names_the_file(tmp_path):
    bad = tmp_path / "labels.gz"
    write_gz(bad, idx_bytes(np.zeros(4, np.uint8), magic_type=0x0D))  # float32 type code
    with pytest.raises(IDXFormatError, match=re.escape(str(bad)) + ".*magic"):
        read_idx_ubyte(bad, ndim=1)
    with pytest.raises(IDXFormatError, match="magic"):  # right type, wrong rank
        read_idx_ubyte(bad, ndim=3)


def test_header_dims_checked_against_bytes(tmp_path):
    bad = tmp_path / "images.gz"
    payload = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    write_gz(bad, payload[:-1])  # one data byte short of what the header promises
    with pytest.raises(IDXFormatError, match=re.escape(str(bad)) + ".*2352 bytes.*2351"):
        read_idx_ubyte(bad, ndim=3)
    write_gz(bad, payload + b"\0")  # and one byte too many
    with pytest.raises(IDXFormatError, match="2353"):
        read_idx_ubyte(bad, ndim=3)


def test_count_mismatch_between_images_and_labels(tmp_path):
    write_split(tmp_path, "t10k", np.zeros((4, 28, 28), np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(IDXFormatError, match="4 images.*3 labels"):
        load_fashion_mnist("test", root=tmp_path)


def test_missing_root_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        load_fashion_mnist("train", root=tmp_path)  # directory exists, files do not
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)
