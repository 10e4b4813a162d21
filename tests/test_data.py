"""Datasets (digits, CIFAR pickles on a generated directory, synthetic), augmentation and the batch loader."""
import gzip
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loft_kernels.data import (
    BatchLoader,
    get_dataset,
    random_crop_flip,
    read_idx,
    stratified_subset,
    write_fake_cifar,
    write_fake_idx,
    write_idx,
)


def _raw(ds, x):
    """Undo the per-channel normalisation."""
    return x * torch.tensor(ds.std).view(1, -1, 1, 1) + torch.tensor(ds.mean).view(1, -1, 1, 1)


def test_digits_fixed_stratified_split():
    from sklearn.datasets import load_digits
    raw = load_digits()
    ds = get_dataset("digits")
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert (ds.num_classes, ds.in_channels, ds.image_size, ds.augment) == (10, 1, (8, 8), False)
    assert abs(float(ds.train_x.mean())) < 1e-5 and abs(float(ds.train_x.std(unbiased=False)) - 1) < 1e-4
    # stratified: each class has 20 % (+-1) of its images in the test split
    for c in range(10):
        total = int((torch.from_numpy(raw.target) == c).sum())
        assert abs(int((ds.test_y == c).sum()) - 0.2 * total) <= 1
    # every image is a raw digit with its own label, and the two splits partition the data set
    pixels = _raw(ds, torch.cat([ds.train_x, ds.test_x])).round().reshape(-1, 64).numpy().astype(np.int64)
    labels = torch.cat([ds.train_y, ds.test_y]).numpy()
    want = sorted(zip(map(tuple, raw.data.astype(np.int64)), raw.target))
    assert sorted(zip(map(tuple, pixels), labels)) == want
    again = get_dataset("digits")
    assert torch.equal(again.test_x, ds.test_x) and torch.equal(again.train_y, ds.train_y)


def _unpickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_loader_reads_the_pickle_layout(tmp_path, classes):
    name = f"cifar{classes}"
    root = write_fake_cifar(tmp_path / "c", n_train=23, n_test=7, num_classes=classes)
    assert not [p for p in os.listdir(root) if p.endswith(".tmp")]
    ds = get_dataset(name, root)
    files = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]
    key = b"labels" if classes == 10 else b"fine_labels"
    batches = [_unpickle(root / f) for f in files]
    data = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b[key]) for b in batches])
    assert ds.train_x.shape == (23, 3, 32, 32) and ds.test_x.shape == (7, 3, 32, 32)
    assert (ds.num_classes, ds.in_channels, ds.image_size, ds.augment) == (classes, 3, (32, 32), True)
    torch.testing.assert_close(_raw(ds, ds.train_x), torch.from_numpy(data).float(), rtol=0, atol=1e-3)
    assert ds.train_y.tolist() == labels.tolist() and ds.train_y.dtype == torch.int64
    test = _unpickle(root / ("test_batch" if classes == 10 else "test"))
    torch.testing.assert_close(_raw(ds, ds.test_x), torch.from_numpy(test[b"data"].reshape(-1, 3, 32, 32)).float(),
                               rtol=0, atol=1e-3)
    for c in range(3):  # per-channel train statistics
        assert ds.mean[c] == pytest.approx(float(data[:, c].mean()), rel=1e-5)


def test_cifar_standard_subfolder(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-py", n_train=10, n_test=5)
    assert get_dataset("cifar10", tmp_path).train_x.shape[0] == 10


def test_cifar_errors_name_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1, .*test_batch"):
        get_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="data_dir is required"):
        get_dataset("cifar10")
    root = write_fake_cifar(tmp_path / "c10", n_train=10, n_test=5)
    (root / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_3"):
        get_dataset("cifar10", root)
    with pytest.raises(FileNotFoundError, match="train, test"):
        get_dataset("cifar100", root)
    (root / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        get_dataset("cifar10", root)
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="uint8 \\[n, 3072\\]"):
        get_dataset("cifar10", root)
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    with pytest.raises(ValueError, match="labels range"):
        get_dataset("cifar10", root)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_cifar_pickles_cannot_run_code(tmp_path):
    root = write_fake_cifar(tmp_path, n_train=10, n_test=5)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": _Payload(), b"labels": []}, f)
    with pytest.raises(ValueError, match="not allowed"):
        get_dataset("cifar10", root)


def test_synthetic_is_configurable_deterministic_and_learnable():
    ds = get_dataset("synthetic", n_train=300, n_test=100, num_classes=5, image_size=6, in_channels=2, seed=3)
    assert ds.train_x.shape == (300, 2, 6, 6) and ds.test_y.shape == (100,)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (5, 2, (6, 6))
    assert sorted(set(ds.train_y.tolist())) == list(range(5))
    assert torch.equal(get_dataset("synthetic", n_train=300, n_test=100, num_classes=5, image_size=6,
                                   in_channels=2, seed=3).train_x, ds.train_x)
    assert not torch.equal(get_dataset("synthetic", n_train=300, n_test=100, num_classes=5, image_size=6,
                                       in_channels=2, seed=4).train_x, ds.train_x)
    # nearest class mean, fitted on train, classifies the test split well: the labels carry signal
    means = torch.stack([ds.train_x[ds.train_y == c].flatten(1).mean(0) for c in range(5)])
    pred = torch.cdist(ds.test_x.flatten(1), means).argmin(1)
    assert float((pred == ds.test_y).float().mean()) > 0.9


def test_get_dataset_bad_input():
    with pytest.raises(ValueError, match="name must be one of"):
        get_dataset("imagenet")
    with pytest.raises(TypeError, match="name must be a dataset name"):
        get_dataset(10)
    with pytest.raises(TypeError, match="do not apply to dataset 'digits'"):
        get_dataset("digits", n_train=5)
    with pytest.raises(TypeError, match="do not apply to dataset 'synthetic'"):
        get_dataset("synthetic", batch=5)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        get_dataset("synthetic", num_classes=1)
    with pytest.raises(ValueError, match="noise"):
        get_dataset("synthetic", noise=-1.0)
    with pytest.raises(ValueError, match="num_classes must be 10"):
        write_fake_cifar("/tmp/unused", 5, 5, num_classes=7)


def _naive_crops(x, padding):
    """Every crop (and its mirror) a padded image can give: the augmentation's possible outputs."""
    p = F.pad(x, (padding,) * 4)
    h, w = x.shape[-2:]
    out = []
    for oy in range(2 * padding + 1):
        for ox in range(2 * padding + 1):
            crop = p[:, oy:oy + h, ox:ox + w]
            out += [crop, torch.flip(crop, dims=[2])]
    return out


def test_random_crop_flip_gives_valid_crops_deterministically():
    x = torch.randn(12, 3, 6, 5)
    out = random_crop_flip(x, torch.Generator().manual_seed(5), padding=2)
    assert out.shape == x.shape
    for n in range(12):
        assert any(torch.equal(out[n], c) for c in _naive_crops(x[n], 2))
    assert torch.equal(out, random_crop_flip(x, torch.Generator().manual_seed(5), padding=2))
    assert not all(torch.equal(out[n], x[n]) for n in range(12))  # it does move things
    flips = random_crop_flip(x, torch.Generator().manual_seed(1), padding=0)  # padding 0: only flips
    mirrored = [torch.equal(flips[n], torch.flip(x[n], dims=[2])) for n in range(12)]
    assert all(m or torch.equal(flips[n], x[n]) for n, m in enumerate(mirrored)) and 0 < sum(mirrored) < 12
    with pytest.raises(TypeError, match="generator"):
        random_crop_flip(x, 5)


def test_loader_shards_workers_and_resumes_exactly():
    x = torch.arange(23, dtype=torch.float32).view(23, 1, 1, 1).expand(23, 1, 4, 4).contiguous()
    y = torch.arange(23)
    loader = BatchLoader(x, y, batch_size=4, seed=7, workers=2)
    assert loader.shard_size == 11 and len(loader) == 3  # 4 + 4 + 3
    seen = []
    for w in range(2):
        batches = list(loader.epoch(0, worker=w))
        assert [len(b[1]) for b in batches] == [4, 4, 3]
        for xb, yb in batches:
            assert torch.equal(xb[:, 0, 0, 0].long(), yb)  # images stay with their labels
        seen.append(torch.cat([b[1] for b in batches]))
    assert not set(seen[0].tolist()) & set(seen[1].tolist())  # workers get disjoint samples
    assert len(set(seen[0].tolist()) | set(seen[1].tolist())) == 22
    assert not torch.equal(torch.cat([b[1] for b in loader.epoch(1)]), seen[0])  # a new permutation each epoch
    assert torch.equal(torch.cat([b[1] for b in loader.epoch(0)]), seen[0])      # and the same one again
    plain = BatchLoader(x, y, batch_size=5, shuffle=False, drop_last=True)
    assert len(plain) == 4 and [b[1].tolist() for b in plain.epoch(3)][0] == [0, 1, 2, 3, 4]
    aug = BatchLoader(torch.randn(20, 2, 6, 6), y[:20], batch_size=3, seed=1, augment=True, workers=2)
    full = list(aug.epoch(2, worker=1))
    resumed = list(aug.epoch(2, worker=1, start=2))
    assert len(resumed) == len(full) - 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[2:], resumed))


def test_loader_bad_input():
    x, y = torch.randn(10, 1, 2, 2), torch.arange(10)
    with pytest.raises(ValueError, match="y must have one label per image"):
        BatchLoader(x, y[:9], 2)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(x, y, 0)
    with pytest.raises(ValueError, match="workers"):
        BatchLoader(x, y, 2, workers=11)
    with pytest.raises(TypeError, match="shuffle"):
        BatchLoader(x, y, 2, shuffle=1)
    loader = BatchLoader(x, y, 2, workers=2)
    with pytest.raises(ValueError, match="worker must lie in"):
        loader.epoch(0, worker=2)
    with pytest.raises(ValueError, match="start"):
        loader.epoch(0, start=4)


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
