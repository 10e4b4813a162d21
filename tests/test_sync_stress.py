"""Repeated 2-process gloo syncs end cleanly: exit 0, or the dead-peer RuntimeError with exit 1; never an abort.

A gloo worker thread that frees a collective's tensors after Python let go of
them needs the GIL; if the process is already exiting, CPython ends that thread
inside a C++ destructor and the process dies with `terminate called without an
active exception` (SIGABRT). The library's collectives hand tensors back only
once gloo has let go (tests/test_collectives.py checks that directly); this is
the end-to-end check: 20 rounds of each case, 20 runs of the sync benchmark and
20 runs of the other distributed tests (about an hour on 2 cores): not in the
default run, run it with `pytest -m stress tests/test_sync_stress.py`.
"""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the default kernel backend, as a user run (and the benchmark) gets
ENV["PYTHONPATH"] = os.pathsep.join([str(HERE.parent)] + [p for p in (ENV.get("PYTHONPATH"),) if p])
ROUNDS = 20

pytestmark = [pytest.mark.stress, pytest.mark.distributed]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pair(syncs: int, die_at=None):
    port = _free_port()
    extra = [] if die_at is None else [str(die_at)]
    procs = [subprocess.Popen([sys.executable, str(HERE / "sync_stress.py"), str(r), str(port), str(syncs), *extra],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], logs


@pytest.mark.parametrize("die_at", [None, 2], ids=["clean-exit", "peer-dies"])
def test_sync_rounds_never_abort(die_at):
    for i in range(ROUNDS):
        codes, logs = _pair(4, die_at)
        assert -signal.SIGABRT not in codes and not any("terminate called" in log for log in logs), (i, logs)
        if die_at is None:
            assert codes == [0, 0], (i, logs)
        else:
            assert codes == [1, 0] and "peer process died" in logs[0], (i, logs)


def _run_rounds(args: list[str], timeout: int) -> None:
    """`python args...` ROUNDS times in a row: each exits 0 and never prints the abort."""
    for i in range(ROUNDS):
        proc = subprocess.run([sys.executable, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout)
        log = proc.stdout.decode(errors="replace")
        assert proc.returncode == 0 and "terminate called" not in log, (i, log[-3000:])


def test_sync_benchmark_never_aborts():
    """The sync benchmark (P5: two gloo processes, the LoFT sync and its baselines) 20 times in a row."""
    _run_rounds(["-m", "loft_kernels.benchmarks", "--cases", "P5", "--repeats", "2", "--warmup", "0", "--no-store"],
                timeout=600)


def test_distributed_tests_never_abort():
    """Every other distributed test (gloo processes, torchrun restarts) 20 times in a row, in fresh pytest runs."""
    _run_rounds(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "distributed and not stress", str(HERE)],
                timeout=1800)
