"""Datasets (digits, CIFAR pickles on a generated directory, synthetic), augmentation and the batch loader."""
import os
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loft_kernels.data import BatchLoader, get_dataset, random_crop_flip, write_fake_cifar


def _address_space() -> int:
    """This process's virtual memory size (torch imported, as in the child), for a limit relative to it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 2 ** 30


def run_cli_in_memory(argv, gib: float = 2.0) -> subprocess.CompletedProcess:
    """`python -m loft_kernels *argv` with `gib` GiB of address space beyond what importing torch takes: what
    should be refused early cannot take the machine down, and an unbounded allocation shows up as a MemoryError."""
    limit = _address_space() + int(gib * 2 ** 30)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(root)] + [p for p in (os.environ.get("PYTHONPATH"),) if p])}
    return subprocess.run([sys.executable, "-m", "loft_kernels", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=root, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))


def assert_one_line_error(r: subprocess.CompletedProcess, command: str, *parts: str) -> None:
    """Exit status 2 and one `loft <command>: error: ...` line holding every one of `parts`."""
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith(f"loft {command}: error: ") and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert all(part in r.stderr for part in parts), r.stderr


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


class _Reduce:
    """Pickles as the call fn(*args): how a hostile file spells what it wants the unpickler to do."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _strided(n: int) -> dict:
    """A ~3 KB batch posing as n images: numpy.ndarray over one image's bytes with a zero stride."""
    u8, i64 = np.dtype(np.uint8), np.dtype(np.int64)
    return {b"data": _Reduce(np.ndarray, (n, 3072), u8, bytes(3072), 0, (0, 1)),
            b"labels": _Reduce(np.ndarray, (n,), i64, bytes(8), 0, (0,))}


def _nested(depth: int) -> list:
    labels = [0]
    for _ in range(depth):
        labels = [labels]
    return labels


_REBUILD = np.empty(0).__reduce__()[0]  # numpy's array rebuilder
_MALFORMED = {  # name -> (pickle bytes or object, what the error must say)
    "strided-array": (_strided(10_000), "numpy.ndarray(...) calls are not allowed"),
    "over-claimed-array": ({b"data": _Reduce(_REBUILD, np.ndarray, (10_000, 3072), b"B"), b"labels": [0] * 10_000},
                           "an array of shape (10000, 3072) and dtype uint8 (30720000 bytes) is more than the file"),
    "nested-labels": ({b"data": np.zeros((1, 3072), np.uint8), b"labels": _nested(70)},
                      "the labels hold a list at index 0, not an int"),
    "shared-sublists": ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [[0] * 100] * 100},
                        "the labels hold a list at index 0"),
    "mixed-keys": ({b"x": 1, 2: 3}, "found ['2', \"b'x'\"]"),
    "huge-memo-index": (b"\x80\x02Nr" + (2 ** 24).to_bytes(4, "little") + b".", "memo index 16777216 at opcode 2"),
    "lying-length": (b"\x80\x04\x8e" + (2 ** 40).to_bytes(8, "little") + b"abc.", "expected 1099511627776 bytes"),
    "foreign-codec": ({b"data": _Reduce(__import__("codecs").encode, "abc", "rot13"), b"labels": []},
                      "_codecs.encode is only allowed for latin1 text"),
}


@pytest.mark.parametrize("case", list(_MALFORMED))
def test_cifar_malformed_files_are_refused_naming_the_file(tmp_path, case):
    root = write_fake_cifar(tmp_path, n_train=10, n_test=5)
    content, message = _MALFORMED[case]
    path = root / "test_batch"
    path.write_bytes(content if isinstance(content, bytes) else pickle.dumps(content, protocol=4))
    with pytest.raises(ValueError) as exc:
        get_dataset("cifar10", root)
    text = str(exc.value)
    assert text.count("\n") == 0 and str(path) in text and message in text, text


def _python2_batch(data: np.ndarray, labels: list) -> bytes:
    """A batch pickled the way the original CIFAR files were (Python 2, protocol 2, str as BINSTRING)."""
    n = data.shape[0].to_bytes(2, "little")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
             b"(K\x01M" + n + b"M\x00\x0c\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
             b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             b"\x89T" + data.nbytes.to_bytes(4, "little") + data.tobytes() + b"tb")
    return (b"\x80\x02}(U\x04data" + array + b"U\x06labels](" + b"".join(b"K" + bytes([v]) for v in labels)
            + b"eu.")


def test_cifar_numpy_pickles_of_every_protocol_load(tmp_path):
    root = write_fake_cifar(tmp_path, n_train=10, n_test=5)
    data, labels = np.arange(4 * 3072).reshape(4, 3072).astype(np.uint8), np.array([3, 0, 9, 1])
    original = _python2_batch(data, labels.tolist())
    assert np.array_equal(pickle.loads(original, encoding="bytes")[b"data"], data)  # the layout is right
    for protocol in ["python2", *range(2, pickle.HIGHEST_PROTOCOL + 1)]:
        (root / "test_batch").write_bytes(original if protocol == "python2" else
                                          pickle.dumps({b"data": data, b"labels": labels}, protocol=protocol))
        ds = get_dataset("cifar10", root)
        assert ds.test_y.tolist() == labels.tolist()
        torch.testing.assert_close(_raw(ds, ds.test_x), torch.from_numpy(data.reshape(4, 3, 32, 32)).float(),
                                   rtol=0, atol=1e-3)


def test_cifar_batches_with_empty_bytes_load_and_bytes_calls_with_arguments_are_refused(tmp_path):
    """Protocol 2 stores b"" as a call of bytes(): the writer's own small sets (an empty batch), and a batch
    whose batch_label is empty, load; bytes(n) (an allocation the file never held) does not."""
    root = write_fake_cifar(tmp_path / "small", n_train=3, n_test=2)  # two of the five training batches are empty
    assert get_dataset("cifar10", root).train_x.shape[0] == 3
    data, labels = np.zeros((2, 3072), np.uint8), [1, 2]
    (root / "test_batch").write_bytes(pickle.dumps({b"batch_label": b"", b"data": data, b"labels": labels},
                                                   protocol=2))
    assert get_dataset("cifar10", root).test_y.tolist() == labels
    (root / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"x": _BytesOf(10 ** 9)},
                                                   protocol=2))
    with pytest.raises(ValueError, match="bytes\\(...\\) with arguments is not allowed"):
        get_dataset("cifar10", root)


class _BytesOf:
    """Pickles as a call bytes(n)."""

    def __init__(self, n):
        self.n = n

    def __reduce__(self):
        return bytes, (self.n,)


def test_cifar_strided_file_via_the_cli_is_one_line(tmp_path):
    root = write_fake_cifar(tmp_path / "data", n_train=10, n_test=5)
    with open(root / "test_batch", "wb") as f:
        pickle.dump(_strided(100_000), f, protocol=2)  # 3 KB posing as 100,000 images (1.2 GB as floats)
    assert (root / "test_batch").stat().st_size < 4000
    out = tmp_path / "out"
    r = run_cli_in_memory(["pretrain", "--dataset", "cifar10", "--data-dir", root, "--epochs", "1", "--out", out])
    assert_one_line_error(r, "pretrain", f"--data-dir: cannot read {root / 'test_batch'}",
                          "numpy.ndarray(...) calls are not allowed")
    assert not out.exists()


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
    images = torch.randn(20, 2, 6, 6)
    aug = BatchLoader(images, y[:20], batch_size=3, seed=1, augment=True, workers=2)
    full = list(aug.epoch(2, worker=1))
    resumed = list(aug.epoch(2, worker=1, start=2))
    assert len(resumed) == len(full) - 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[2:], resumed))
    cl = BatchLoader(images, y[:20], batch_size=3, seed=1, augment=True, workers=2,
                     memory_format=torch.channels_last)
    for a, b in zip(full, cl.epoch(2, worker=1)):  # the same batches, in the asked layout
        assert b[0].is_contiguous(memory_format=torch.channels_last) and not b[0].is_contiguous()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


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
    with pytest.raises(TypeError, match="memory_format must be None or a torch.memory_format"):
        BatchLoader(x, y, 2, memory_format="channels_last")
    loader = BatchLoader(x, y, 2, workers=2)
    with pytest.raises(ValueError, match="worker must lie in"):
        loader.epoch(0, worker=2)
    with pytest.raises(ValueError, match="start"):
        loader.epoch(0, start=4)
