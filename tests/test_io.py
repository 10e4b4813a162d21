"""Atomic checkpoint writing: a failed write never replaces or truncates a good file."""
import os
import sys

import pytest
import torch

import loft_kernels as lk
from loft_kernels.io import CheckpointError, atomic_write, atomic_write_text


def test_atomic_save_roundtrip(tmp_path):
    path = lk.atomic_save({"w": torch.arange(5.0), "step": 3}, tmp_path / "sub" / "ckpt.pt")
    loaded = lk.load_checkpoint(path)
    assert loaded["step"] == 3 and torch.equal(loaded["w"], torch.arange(5.0))


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "ckpt.pt"
    lk.atomic_save({"v": 1}, path)

    def crash(f):
        f.write(b"partial")
        raise KeyboardInterrupt  # as if the process were interrupted mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert lk.load_checkpoint(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_text_and_bad_input(tmp_path):
    atomic_write_text("hello", tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_text() == "hello"
    with pytest.raises(TypeError, match="text must be a str"):
        atomic_write_text(b"x", tmp_path / "b.txt")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        lk.atomic_save({}, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lk.load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="mode must be"):
        atomic_write(tmp_path / "c", lambda f: None, mode="a")


class Evil:
    pass


def test_load_checkpoint_refuses_arbitrary_objects(tmp_path):
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        lk.load_checkpoint(tmp_path / "evil.pt")


@pytest.mark.parametrize("content", [b"", b"hello", b"\x80\x02}q\x00.", None], ids=["empty", "text", "bad-pickle",
                                                                               "truncated"])
def test_unreadable_files_name_the_file(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    if content is None:
        lk.atomic_save({"w": torch.arange(1000.0)}, path)
        content = path.read_bytes()[:300]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"checkpoint '.*ckpt\.pt' cannot be loaded") as exc:
        lk.load_checkpoint(path)
    assert isinstance(exc.value, ValueError) and str(exc.value).count("\n") == 0


def test_a_directory_is_not_called_missing(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        lk.load_checkpoint(tmp_path)


def test_load_checkpoint_names_a_bad_map_location_and_refuses_a_pipe(tmp_path):
    path = lk.atomic_save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    with pytest.raises(ValueError, match="map_location must name a device such as 'cpu'.*'bogus'"):
        lk.load_checkpoint(path, map_location="bogus")
    with pytest.raises(TypeError, match="map_location must be None, a device .* got float"):
        lk.load_checkpoint(path, map_location=1.5)
    assert torch.equal(lk.load_checkpoint(path, map_location="cpu")["w"], torch.ones(2))
    os.mkfifo(tmp_path / "pipe")  # reading it would block until a writer came
    with pytest.raises(CheckpointError, match="is not a regular file"):
        lk.load_checkpoint(tmp_path / "pipe")
    with pytest.raises(ValueError, match="path must name a file, got an empty path"):
        lk.atomic_save({}, "")


def test_optional_dependencies_say_which_extra(monkeypatch):
    from loft_kernels._optional import missing_message, require
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'loft_kernels\[plots\]'"):
        require("matplotlib")
    assert missing_message("sklearn.datasets").endswith("pip install 'loft_kernels[digits]'")
    assert missing_message("numpy") is None
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        require("no_such_module")  # not optional: torch's own error, untouched


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask):
    import os
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:  # the reference: what open() creates under this umask
            f.write("x")
        atomic_write_text("x", tmp_path / "a.txt")
        lk.atomic_save({"v": 1}, tmp_path / "sub" / "ckpt.pt")
    finally:
        os.umask(old)
    want = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == want
    assert (tmp_path / "sub" / "ckpt.pt").stat().st_mode & 0o777 == want


def test_rewriting_a_file_keeps_its_mode(tmp_path):
    import os
    path = tmp_path / "a.txt"
    atomic_write_text("one", path)
    os.chmod(path, 0o640)
    atomic_write_text("two", path)
    assert path.read_text() == "two" and path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_check_writable_says_why_and_leaves_nothing(tmp_path):
    from loft_kernels.io import check_writable
    check_writable(tmp_path / "new" / "deeper" / "r.json")  # missing folders are fine: the writer creates them
    check_writable(tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="file.* is a file, not a directory"):
        check_writable(tmp_path / "file" / "r.json")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        check_writable(tmp_path)
    with pytest.raises(OSError, match="the folder '/sys' is not writable"):
        check_writable("/sys/r.json")
    with pytest.raises(TypeError, match="path must be"):
        check_writable(3)
