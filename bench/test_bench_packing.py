"""pack_rows / unpack_rows of one LoFT-4 worker's filters of PreActResNet-18 (8 groups x 6 tensors).

Beside the per-tensor torch loop (the reference) and one contiguous copy of
the same bytes (the floor for a memory-bound gather/scatter).
"""
from loft_kernels.benchmarks import workloads as W


def test_pack_rows(backend, device, run):
    run(W.pack_setup(device), "pack_rows", backend=backend)


def test_pack_rows_loop_baseline(run, device):
    run(W.pack_setup(device, "loop"), "pack_rows", baseline="index_select per tensor + cat")


def test_pack_rows_copy_baseline(run, device):
    run(W.pack_setup(device, "copy"), "pack_rows", baseline="one contiguous copy")


def test_unpack_rows(backend, device, run):
    run(W.unpack_setup(device), "unpack_rows", backend=backend)


def test_unpack_rows_loop_baseline(run, device):
    run(W.unpack_setup(device, "loop"), "unpack_rows", baseline="index_copy_ per tensor")


def test_unpack_rows_copy_baseline(run, device):
    run(W.unpack_setup(device, "copy"), "unpack_rows", baseline="one contiguous copy")
