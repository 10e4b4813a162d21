"""MNIST-family datasets from idx files: generated directories, corrupted files, and the real Fashion-MNIST."""
import gzip
import re
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import _raw, assert_one_line_error, run_cli_in_memory

from loft_kernels.data import BatchLoader, get_dataset, read_idx, stratified_subset, write_fake_idx, write_idx


# -------------------------------------------------------- idx datasets ----
def _parse_idx(path):
    """An independent reader: gunzip if named .gz, 4-byte magic, big-endian dims, then the bytes."""
    raw = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        raw = gzip.decompress(raw)
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw[4 + 4 * ndim:], np.uint8).reshape(dims).copy()


IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@pytest.mark.parametrize("name,compress", [("mnist", True), ("kmnist", False), ("fashion-mnist", True)])
def test_idx_datasets_read_the_standard_layout(tmp_path, name, compress):
    root = write_fake_idx(tmp_path / name, n_train=40, n_test=20, compress=compress, seed=2)
    suffix = ".gz" if compress else ""
    ds = get_dataset(name, root)
    tr_x, tr_y, te_x, te_y = (_parse_idx(root / (f + suffix)) for f in IDX_FILES)
    assert ds.train_x.shape == (40, 1, 28, 28) and ds.test_x.shape == (20, 1, 28, 28)
    assert (ds.name, ds.num_classes, ds.in_channels, ds.image_size, ds.augment) == (name, 10, 1, (28, 28), False)
    torch.testing.assert_close(_raw(ds, ds.train_x)[:, 0], torch.from_numpy(tr_x).float(), rtol=0, atol=1e-3)
    torch.testing.assert_close(_raw(ds, ds.test_x)[:, 0], torch.from_numpy(te_x).float(), rtol=0, atol=1e-3)
    assert ds.train_y.tolist() == tr_y.tolist() and ds.test_y.tolist() == te_y.tolist()
    assert ds.mean[0] == pytest.approx(float(tr_x.mean()), rel=1e-5)
    assert ds.std[0] == pytest.approx(float(tr_x.std()), rel=1e-4)


def test_idx_reader_takes_gzip_by_content_and_mixed_layouts(tmp_path):
    root = write_fake_idx(tmp_path, n_train=20, n_test=10, compress=False)
    plain = get_dataset("mnist", root)
    # one file compressed, the plain copy removed: found under its .gz name
    data = (root / IDX_FILES[0]).read_bytes()
    (root / (IDX_FILES[0] + ".gz")).write_bytes(gzip.compress(data))
    (root / IDX_FILES[0]).unlink()
    assert torch.equal(get_dataset("mnist", root).train_x, plain.train_x)
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.idx", arr, compress=True), 3, (3, 4)), arr)


def _corrupt(path, case):
    raw = bytearray(gzip.decompress(path.read_bytes()))
    if case == "magic":
        raw[2] = 0x0D  # float elements
    elif case == "dims":
        raw[8:12] = (27).to_bytes(4, "big")  # 27 rows, not 28
    elif case == "truncated":
        raw = raw[:-100]
    elif case == "trailing":
        raw += b"\0" * 7
    path.write_bytes(gzip.compress(bytes(raw)))


@pytest.mark.parametrize("case,file,message", [
    ("magic", IDX_FILES[0], "wrong magic number 0x00000d03; expected 0x00000803"),
    ("dims", IDX_FILES[2], "dimensions 10 x 27 x 28; expected N x 28 x 28"),
    ("truncated", IDX_FILES[0], "is truncated: its header announces 20 x 28 x 28 = 15680 bytes of data but it holds"),
    ("trailing", IDX_FILES[1], "has 7 bytes after the 20 bytes of data"),
])
def test_idx_corrupted_files_name_the_file_and_the_fault(tmp_path, case, file, message):
    root = write_fake_idx(tmp_path, n_train=20, n_test=10)
    _corrupt(root / (file + ".gz"), case)
    with pytest.raises(ValueError, match=re.escape(str(root / (file + ".gz"))) + ".*" + re.escape(message)):
        get_dataset("mnist", root)


def test_idx_other_faults(tmp_path):
    root = write_fake_idx(tmp_path, n_train=20, n_test=10)
    labels = root / (IDX_FILES[3] + ".gz")
    good = labels.read_bytes()
    write_idx(labels, np.array([0, 1, 2, 3, 4, 5, 6, 7, 8], np.uint8))  # 9 labels for 10 images
    with pytest.raises(ValueError, match="holds 10 images but .*t10k-labels-idx1-ubyte.gz holds 9 labels"):
        get_dataset("kmnist", root)
    write_idx(labels, np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 10], np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz has label 10 at index 9; labels must lie in "
                                         r"\[0, 10\)"):
        get_dataset("kmnist", root)
    labels.write_bytes(good[:len(good) // 2])  # a gzip stream cut short
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz is not a valid gzip file"):
        get_dataset("kmnist", root)
    labels.write_bytes(gzip.decompress(good))  # named .gz but stored plain
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz is not a gzip file"):
        get_dataset("kmnist", root)
    labels.write_bytes(gzip.compress(b"\0\0"))
    with pytest.raises(ValueError, match="too short"):
        get_dataset("kmnist", root)
    labels.unlink()
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        get_dataset("kmnist", root)


def _idx_bomb(path, claim_dims, data_bytes: int, zeros_mib: int) -> Path:
    """An idx file whose header claims `claim_dims`, holding `data_bytes` bytes and then `zeros_mib` MiB of zeros,
    as many gzip members (valid gzip: each member has its own checksum) so the file stays ~1 KB per MiB."""
    header = struct.pack(f">I{len(claim_dims)}I", 0x800 | len(claim_dims), *claim_dims)
    path.write_bytes(gzip.compress(header + bytes(data_bytes)) + gzip.compress(bytes(1 << 20)) * zeros_mib)
    return path


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_idx_trailing_gigabytes_are_not_decompressed(tmp_path):
    bomb = _idx_bomb(tmp_path / "x.gz", (1, 28, 28), 784, zeros_mib=64)  # 70 KB file, 64 MiB of zeros
    assert bomb.stat().st_size < 100_000

    def read():
        with pytest.raises(ValueError, match=re.escape(f"{bomb} has more than 1048576 bytes after the 784 bytes")):
            read_idx(bomb, 3, (28, 28))
    assert _peak_bytes(read) < 8 * 2 ** 20  # reading stops one chunk past the data the header announces


def test_idx_claims_the_file_cannot_hold_are_refused_before_reading(tmp_path):
    huge = _idx_bomb(tmp_path / "huge.gz", (2 ** 32 - 1, 28, 28), 0, zeros_mib=0)
    message = (f"{huge} announces 4294967295 x 28 x 28 = {(2 ** 32 - 1) * 784} bytes of data in its header, more than a "
               f"{huge.stat().st_size}-byte gzip file can hold")

    def read():
        with pytest.raises(ValueError, match=re.escape(message)):
            read_idx(huge, 3, (28, 28))
    assert _peak_bytes(read) < 2 ** 20
    plain = tmp_path / "plain"  # uncompressed: the file's size bounds the claim
    plain.write_bytes(gzip.decompress(_idx_bomb(tmp_path / "p.gz", (2 ** 31, 1), 3, zeros_mib=0).read_bytes()))
    with pytest.raises(ValueError, match=re.escape(f"{plain} is truncated: its header announces 2147483648 x 1 = "
                                                   f"2147483648 bytes of data but it holds 3")):
        read_idx(plain, 2, (1,))


def test_idx_bomb_via_the_cli_is_one_line(tmp_path):
    root = write_fake_idx(tmp_path / "data", n_train=20, n_test=10)
    bomb = _idx_bomb(root / (IDX_FILES[0] + ".gz"), (20, 28, 28), 20 * 784, zeros_mib=4096)  # 4 MB -> 4 GiB
    out = tmp_path / "out"
    r = run_cli_in_memory(["pretrain", "--dataset", "mnist", "--data-dir", root, "--epochs", "1", "--out", out])
    assert_one_line_error(r, "pretrain", f"--data-dir: {bomb} has more than 1048576 bytes after the 15680 bytes")
    assert not out.exists()


def test_idx_directories_and_the_fashion_mnist_default(tmp_path, monkeypatch):
    from loft_kernels.data import idx
    with pytest.raises(ValueError, match="data_dir is required for dataset 'mnist'"):
        get_dataset("mnist")
    with pytest.raises(FileNotFoundError, match="missing train-images-idx3-ubyte, .*never downloaded"):
        get_dataset("kmnist", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        get_dataset("fashion-mnist", tmp_path / "none")
    monkeypatch.setitem(idx.DEFAULT_DIRS, "fashion-mnist", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="no data_dir given and the default .*absent does not exist.*apt-get"):
        get_dataset("fashion-mnist")
    write_fake_idx(tmp_path / "present", n_train=20, n_test=10)
    monkeypatch.setitem(idx.DEFAULT_DIRS, "fashion-mnist", str(tmp_path / "present"))
    assert get_dataset("fashion-mnist").train_x.shape == (20, 1, 28, 28)
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "f.idx", np.zeros(3, np.float32))


def test_stratified_subset_keeps_class_shares():
    ds = get_dataset("digits")
    sub = stratified_subset(ds, 500, seed=3)
    assert sub.train_x.shape == (500, 1, 8, 8) and torch.equal(sub.test_x, ds.test_x)
    full, part = torch.bincount(ds.train_y), torch.bincount(sub.train_y)
    assert int(part.sum()) == 500 and ((part.double() - full.double() * 500 / len(ds.train_y)).abs() < 1).all()
    rows = {tuple(r.tolist()): int(y) for r, y in zip(ds.train_x.flatten(1), ds.train_y)}
    assert all(rows[tuple(r.tolist())] == int(y) for r, y in zip(sub.train_x.flatten(1), sub.train_y))
    assert torch.equal(stratified_subset(ds, 500, seed=3).train_x, sub.train_x)
    assert not torch.equal(stratified_subset(ds, 500, seed=4).train_y, sub.train_y)
    assert stratified_subset(ds, len(ds.train_y)) is ds
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 1437\] \(the train images of digits\)"):
        stratified_subset(ds, 0)
    test = stratified_subset(ds, 100, split="test")
    assert torch.equal(test.train_x, ds.train_x) and test.test_x.shape[0] == 100
    assert (torch.bincount(test.test_y) - torch.bincount(ds.test_y) * 100 / 360).abs().max() < 1
    with pytest.raises(ValueError, match="split must be"):
        stratified_subset(ds, 10, split="val")
    with pytest.raises(TypeError, match="dataset must be"):
        stratified_subset("digits", 5)


# ------------------------------------------- the real Fashion-MNIST files ----
FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not all((FASHION / (f + ".gz")).is_file() for f in IDX_FILES),
                                   reason=f"Fashion-MNIST is not installed in {FASHION} "
                                          f"(apt-get install -y dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def fashion():
    return get_dataset("fashion-mnist")


@needs_fashion
def test_fashion_mnist_matches_its_files(fashion):
    tr_x, tr_y, te_x, te_y = (_parse_idx(FASHION / (f + ".gz")) for f in IDX_FILES)
    assert tr_x.shape == (60000, 28, 28) and te_x.shape == (10000, 28, 28)
    assert fashion.train_x.shape == (60000, 1, 28, 28) and fashion.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(fashion.train_y).tolist() == [6000] * 10
    assert torch.bincount(fashion.test_y).tolist() == [1000] * 10
    assert fashion.train_y.tolist() == tr_y.tolist() and fashion.test_y.tolist() == te_y.tolist()
    raw = _raw(fashion, fashion.train_x[::97])[:, 0]
    assert float(raw.min()) > -1e-3 and float(raw.max()) < 255 + 1e-3
    torch.testing.assert_close(raw, torch.from_numpy(tr_x[::97]).float(), rtol=0, atol=2e-3)
    torch.testing.assert_close(_raw(fashion, fashion.test_x[::53])[:, 0], torch.from_numpy(te_x[::53]).float(),
                               rtol=0, atol=2e-3)
    assert fashion.mean[0] == pytest.approx(float(tr_x.mean()), rel=1e-5)


@needs_fashion
def test_fashion_mnist_corrupted_copies(tmp_path):
    for f in IDX_FILES:
        shutil.copy(FASHION / (f + ".gz"), tmp_path / (f + ".gz"))
    labels = tmp_path / (IDX_FILES[1] + ".gz")
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[8 + 123] = 11
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz has label 11 at index 123"):
        get_dataset("fashion-mnist", tmp_path)
    labels.write_bytes(gzip.compress(bytes(raw[:-1])))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz is truncated: its header announces 60000 bytes"):
        get_dataset("fashion-mnist", tmp_path)
    shutil.copy(FASHION / (IDX_FILES[1] + ".gz"), labels)
    images = tmp_path / (IDX_FILES[2] + ".gz")
    images.write_bytes(images.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is not a valid gzip file"):
        get_dataset("fashion-mnist", tmp_path)


@needs_fashion
@pytest.mark.parametrize("method,workers,epochs", [("dense", 1, 1), ("loft", 2, 3)])
def test_fashion_mnist_short_training_reaches_80_percent(fashion, method, workers, epochs):
    from loft_kernels import engine
    data = stratified_subset(fashion, 19200, seed=0)
    cfg = engine.TrainConfig(method=method, workers=workers, epochs=epochs, batch_size=64, lr=0.05, sync_every=15)
    torch.manual_seed(0)
    model, groups = engine.build_model(engine.model_spec("vgg", data, width=0.25))
    trainer = engine.make_trainer(model, groups, data, cfg, seed=0, device="cpu")
    steps = trainer.steps_per_epoch * epochs  # per worker: LoFT's workers step in lockstep on disjoint shards
    assert 300 <= steps <= 450
    for epoch in range(epochs):
        trainer.train_epoch(epoch)
    loader = BatchLoader(data.train_x, data.train_y, 500, seed=1)
    model = engine.recalibrate_bn(trainer.model, loader)  # LoFT's running statistics describe sub-models
    acc = engine.evaluate(model, fashion.test_x, fashion.test_y)["acc"]
    assert acc >= 80.0, f"{method}-{workers} after {steps} steps: {acc:.2f}% test accuracy on Fashion-MNIST"
