"""Elastic checkpoints: sets of every rank, newest complete set, mid-epoch resume equal to an uninterrupted run.

The library helper is checked against a plainly written training loop; the
engine's mid-epoch resume (dense and simulated LoFT) against an uninterrupted
run; and the real thing: torchrun with 2 gloo ranks and --max-restarts 1, one
rank killed with SIGKILL mid-epoch, the job finishing by itself with the same
model bit for bit.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import loft_kernels as lk
from loft_kernels import engine
from loft_kernels.data import BatchLoader, get_dataset
from loft_kernels.elastic import ElasticCheckpoint, Position, restart_count
from loft_kernels.io import CheckpointError

torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LOFT_KERNELS_BACKEND": "torch"}
ENV.pop("TORCHELASTIC_RESTART_COUNT", None)
ENV["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1])] +
                                    [p for p in (ENV.get("PYTHONPATH"),) if p])  # this checkout's package


@pytest.fixture(scope="module")
def data():
    return get_dataset("synthetic", seed=0, n_train=96, n_test=40, num_classes=4, image_size=8)


def tiny_spec(data):
    return {"model": "preact_resnet", "kwargs": {"depths": [1, 1, 1, 1], "width": 0.125,
                                                   "num_classes": data.num_classes, "in_channels": 1},
            "input_shape": [1, 8, 8], "policy": "all", "include": None, "exclude": None}


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------- the files ----
def test_sets_are_kept_pruned_and_found(tmp_path):
    ck = ElasticCheckpoint(tmp_path, keep=2)
    assert ck.own_steps() == [] and ck.load_latest() is None
    for step in (3, 6, 9):
        ck.save(step, {"v": torch.tensor([step])})
    assert ck.complete_steps() == [6, 9]  # the newest 2 kept, the older folder removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000000006", "step-0000000009"]
    step, state = ElasticCheckpoint(tmp_path).load_latest()
    assert step == 9 and torch.equal(state["v"], torch.tensor([9]))
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files


def test_a_set_is_complete_only_with_every_ranks_file(tmp_path):
    # Two ranks sharing a directory, seen one at a time (no process group): each sees its own files.
    r0, r1 = (ElasticCheckpoint(tmp_path, rank=r, world=2, keep=5, distributed=False) for r in (0, 1))
    r0.save(4, {"r": 0})
    r1.save(4, {"r": 1})
    r0.save(8, {"r": 0})  # rank 1 died before writing step 8
    assert r0.own_steps() == [4, 8] and r1.own_steps() == [4]
    assert set(r0.own_steps()) & set(r1.own_steps()) == {4}


def test_bad_arguments_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ElasticCheckpoint(tmp_path, keep=0)
    with pytest.raises(ValueError, match="every must be >= 1"):
        ElasticCheckpoint(tmp_path, every=0)
    with pytest.raises(ValueError, match="rank must lie in 0..1"):
        ElasticCheckpoint(tmp_path, rank=2, world=2, distributed=False)
    with pytest.raises(TypeError, match="directory must be"):
        ElasticCheckpoint(3)
    with pytest.raises(ValueError, match="distributed=True needs torch.distributed"):
        ElasticCheckpoint(tmp_path, distributed=True)
    ck = ElasticCheckpoint(tmp_path)
    with pytest.raises(TypeError, match="state must be a dict"):
        ck.save(1, [1])
    ck.path(5).parent.mkdir(parents=True)
    ck.path(5).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="step-0000000005.*cannot be loaded"):
        ck.load_latest()


def _sets_of_world(directory, world: int, steps) -> None:
    for rank in range(world):
        ck = ElasticCheckpoint(directory, rank=rank, world=world, keep=5, distributed=False)
        for step in steps:
            ck.save(step, {"r": rank})


def test_sets_of_another_world_size_are_refused_not_ignored(tmp_path):
    model = torch.nn.Linear(2, 2)
    _sets_of_world(tmp_path / "a", 2, [4, 8])
    ck = ElasticCheckpoint(tmp_path / "a")  # world size 1
    for call in (ck.load_latest, lambda: ck.resume(model)):
        with pytest.raises(CheckpointError, match=r"world size 2 \(newest at step 8\), but this job has world "
                                                  r"size 1; .*restart with 2 ranks"):
            call()
    # an older set of this world size is not resumed silently either
    _sets_of_world(tmp_path / "a", 1, [3])
    with pytest.raises(CheckpointError, match="its newest set of world size 1 is step 3"):
        ck.resume(model)
    # a newer set of this world size resumes; the older foreign files are left alone
    _sets_of_world(tmp_path / "b", 4, [2])
    _sets_of_world(tmp_path / "b", 2, [5])
    assert ElasticCheckpoint(tmp_path / "b", rank=1, world=2, distributed=False).load_latest() == (5, {"r": 1})
    assert (tmp_path / "b" / "step-0000000002" / "rank3-of-4.pt").is_file()


def _resume_other_world(rank, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        directory = Path(root) / f"local{rank}"  # node-local folders: only rank 1 sees the foreign files
        if rank == 1:
            _sets_of_world(directory, 4, [6])
        try:
            ElasticCheckpoint(directory).resume(torch.nn.Linear(2, 2))
            result = "resumed"
        except CheckpointError as exc:
            result = str(exc)
        torch.distributed.barrier()  # both ranks got here: nobody hangs in a collective the other skipped
        (Path(root) / f"rank{rank}.txt").write_text(result)
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_refuses_another_world_size_seen_by_one(tmp_path):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_resume_other_world, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert "world size 4 (newest at step 6), but this job has world size 2" in text, text


# ---------------------------------------------- the one-call user helper ----
def user_loop(data, directory, *, epochs=3, every=4, stop_after=None):
    """A user's own LoFT loop (2 simulated workers) with ElasticCheckpoint.resume/maybe_save."""
    torch.manual_seed(0)
    model, groups = engine.build_model(tiny_spec(data))
    sim = lk.LoftSimulator(model, groups, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), workers=2,
                           sync_every=2, seed=5)
    loader = BatchLoader(data.train_x, data.train_y, 8, seed=1, workers=2)
    ck = ElasticCheckpoint(directory, every=every, keep=2)
    pos = ck.resume(sim.model, sim)
    steps = pos.step
    for epoch in range(pos.epoch, epochs):
        start = pos.batch if epoch == pos.epoch else 0
        for b, batches in enumerate(zip(*(loader.epoch(epoch, worker=s, start=start) for s in range(2))),
                                    start=start):
            sim.step(list(batches), F.cross_entropy)
            steps += 1
            ck.maybe_save(sim.model, sim, step=steps, epoch=epoch, batch=b + 1)
            if steps == stop_after:
                return None, pos
        sim.finalize()
    return sim.model.state_dict(), pos


def test_user_loop_resumes_mid_epoch_exactly(data, tmp_path):
    full, pos = user_loop(data, tmp_path / "full")
    assert pos == Position()  # nothing to resume from
    assert user_loop(data, tmp_path / "cut", stop_after=17)[0] is None  # "killed" at step 17 (mid-round)
    resumed, pos = user_loop(data, tmp_path / "cut")
    # every=4 and sync_every=2: saves at steps 4, 8, 12, 16; 6 batches per epoch, so 16 is batch 4 of epoch 2
    assert pos.resumed and (pos.step, pos.epoch, pos.batch) == (16, 2, 4)
    assert state_equal(full, resumed)


def test_saves_wait_for_a_sync_boundary(tmp_path):
    class MidRound:
        step_in_round = 1

    ck = ElasticCheckpoint(tmp_path, every=2)
    model = torch.nn.Linear(2, 2)
    assert not ck.maybe_save(model, MidRound(), step=2, epoch=0, batch=2)
    assert ck.maybe_save(model, torch.optim.SGD(model.parameters(), lr=0.1), step=3, epoch=0, batch=3)
    assert not ck.maybe_save(model, None, step=4, epoch=0, batch=4)  # only 1 step since the last save
    assert ck.complete_steps() == [3]


def test_restart_count_reads_torchrun(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert restart_count() == 2
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    assert restart_count() == 0


# ------------------------------------------------ engine: mid-epoch resume ----
@pytest.mark.parametrize("workers", [1, 2], ids=["dense", "loft-2-simulated"])
def test_pretrain_resumes_mid_epoch_exactly(data, tmp_path, workers):
    cfg = engine.TrainConfig(method="dense" if workers == 1 else "loft", workers=workers, epochs=3, batch_size=8,
                             sync_every=3)
    run = dict(dataset=data, spec=tiny_spec(data), cfg=cfg, seed=2, device="cpu", checkpoint_every=3,
               keep_checkpoints=100)
    full = engine.pretrain_run(tmp_path / "full", **run)
    steps = sorted(int(p.name[5:]) for p in (tmp_path / "full" / "checkpoints").iterdir())
    spe = 12 // workers  # 96 images / workers / batch 8
    mid = [s for s in steps if s % spe]
    assert mid and all(s % 3 == 0 or workers == 1 for s in mid)  # LoFT saves only at sync boundaries
    # "Kill" right after a mid-epoch checkpoint: a copy of the run without anything written after it.
    cut_at = mid[len(mid) // 2]
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for p in (cut / "checkpoints").iterdir():
        if int(p.name[5:]) > cut_at:
            shutil.rmtree(p)
    for name in ("summary.json", "model.pt", "tracker.pt"):
        (cut / name).unlink()
    resumed = engine.pretrain_run(cut, resume=True, **run)
    assert len(resumed["resumes"]) == 1 and resumed["resumes"][0]["step"] == cut_at
    assert resumed["resumes"][0]["batch"] == cut_at % spe > 0
    a = engine.load_model_file(tmp_path / "full" / "model.pt")["state_dict"]
    b = engine.load_model_file(cut / "model.pt")["state_dict"]
    assert state_equal(a, b)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(json.loads((tmp_path / "full" / "metrics.json").read_text())) == \
        drop(json.loads((cut / "metrics.json").read_text()))
    assert resumed["comm"] == full["comm"] and resumed["final"] == full["final"]


def test_checkpoint_sets_are_capped(data, tmp_path):
    cfg = engine.TrainConfig(epochs=2, batch_size=8)
    engine.pretrain_run(tmp_path, dataset=data, spec=tiny_spec(data), cfg=cfg, seed=0, device="cpu",
                        checkpoint_every=2, keep_checkpoints=3)
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == \
        ["step-0000000020", "step-0000000022", "step-0000000024"]


# ------------------------------------------- torchrun: kill and restart ----
TINY = ["--dataset", "synthetic", "--model", "preact_resnet", "--width", "0.125", "--batch-size", "8",
        "--workers", "2", "--sync-every", "2", "--epochs", "2", "--seed", "4", "--device", "cpu", "--quiet",
        "--distributed", "--checkpoint-every", "2"]
SPE = 512 // 2 // 8  # synthetic: 512 training images, 2 ranks, batch 8 -> 32 steps per epoch


def _torchrun(out, rdzv):
    if rdzv == "c10d":
        launch = ["--standalone"]
    else:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch = ["--rdzv-backend", "static", "--master-addr", "127.0.0.1", "--master-port", str(port),
                  "--nnodes", "1", "--node-rank", "0"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc-per-node", "2", "--max-restarts", "1",
            "--monitor-interval", "0.2", "-m", "loft_kernels", "pretrain", *TINY, "--out", str(out)]


def _worker_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank among `parent`'s children (read from /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find torchrun's workers")
@pytest.mark.parametrize("rdzv", ["c10d", "static"])
def test_torchrun_restarts_after_sigkill_and_finishes_bit_identical(tmp_path, rdzv):
    full = tmp_path / "full"
    r = subprocess.run(_torchrun(full, rdzv), env=ENV, timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(killed, rdzv), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        first_mid = killed / "checkpoints" / "step-0000000002"
        while not (first_mid / "rank1-of-2.pt").exists() or not (first_mid / "rank0-of-2.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "no mid-epoch checkpoint set appeared"
            time.sleep(0.01)
        victim = _worker_pid(proc.pid, 1)
        assert victim is not None, "could not find rank 1's process"
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = out.decode(errors="replace")
    assert proc.returncode == 0, log[-3000:]
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["torchrun_restarts"] == 1 and len(summary["resumes"]) == 1, summary["resumes"]
    resume = summary["resumes"][0]
    assert resume["step"] % SPE != 0 and resume["batch"] > 0 and resume["torchrun_restart"] == 1  # mid-epoch
    a = engine.load_model_file(full / "model.pt")["state_dict"]
    b = engine.load_model_file(killed / "model.pt")["state_dict"]
    assert state_equal(a, b)
    assert json.loads((full / "summary.json").read_text())["comm"] == summary["comm"]
