"""filter_norms, filter_stats, footrule_matrix and mask_distance_matrix on PreActResNet-18-sized data.

Statistics run over a synthetic "model": every PreActResNet-18 conv weight
(11.2 M floats per snapshot, one flat buffer), beside one read of the data (the
memory-bound floor) and the per-layer torch loop. Rankings run over T = 40
snapshots of the eight filter groups (1920 filters), beside the vectorised
torch reference (and, for the footrule, plain Python loops).
"""
from loft_kernels.benchmarks import workloads as W
from loft_kernels.benchmarks.shapes import preact_resnet18_convs

SNAPSHOT_BYTES = 4 * sum(s.c_out * s.c_in * s.kernel ** 2 for s in preact_resnet18_convs())


def test_filter_norms(backend, device, run):
    run(W.filter_norms_setup(device), "filter_norms", backend=backend, bytes=SNAPSHOT_BYTES)


def test_filter_norms_read_baseline(run, device):
    run(W.filter_norms_setup(device, "read"), "filter_norms", baseline="one read (dot product)", bytes=SNAPSHOT_BYTES)


def test_filter_norms_loop_baseline(run, device):
    run(W.filter_norms_setup(device, "loop"), "filter_norms", baseline="per-layer torch loop")


def test_filter_stats(backend, device, run):
    run(W.filter_stats_setup(device), "filter_stats", backend=backend, bytes=2 * SNAPSHOT_BYTES)


def test_filter_stats_read_baseline(run, device):
    run(W.filter_stats_setup(device, "read"), "filter_stats", baseline="one read of both (dot product)",
        bytes=2 * SNAPSHOT_BYTES)


def test_filter_stats_loop_baseline(run, device):
    run(W.filter_stats_setup(device, "loop"), "filter_stats", baseline="per-layer torch loop")


def test_footrule_matrix(backend, device, run):
    run(W.footrule_setup(device), "footrule_matrix", backend=backend, snapshots=W.SNAPSHOTS)


def test_footrule_vectorised_baseline(run, device):
    run(W.footrule_setup(device, "vectorised"), "footrule_matrix", baseline="vectorised torch")


def test_footrule_naive_baseline(run, device):
    # seconds per call: two rounds, no warm-up, to keep the default run short
    run(W.footrule_setup(device, "naive"), "footrule_matrix", rounds=2, warmup=0, baseline="Python loops")


def test_mask_distance_matrix(backend, device, run):
    run(W.mask_distance_setup(device), "mask_distance_matrix", backend=backend, snapshots=W.SNAPSHOTS)


def test_mask_distance_vectorised_baseline(run, device):
    run(W.mask_distance_setup(device, "vectorised"), "mask_distance_matrix", baseline="vectorised torch")
