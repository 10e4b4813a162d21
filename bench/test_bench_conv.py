"""partial_conv2d and grouped_partial_conv2d, forward + backward, per PreActResNet-18 stage shape.

Group "conv <C>@<H> out": the op on each backend with 1/4 of the output
filters (a LoFT-4 worker's conv_a), beside the same conv on a physically sliced
weight (the floor), the obvious `F.conv2d(x, w.index_select(0, rows))`, the
dense conv (FLOP limit x 4) and the `weight * mask` conv. Group "conv <C>@<H>
in": the op with 1/4 of the input channels (its conv_b) beside its own floor,
the conv on the sliced input and weight columns. Group "grouped <C>@<H>": 4
workers' subsets in one grouped op against a loop of 4 partial convs and 4
sliced convs.

pytest-benchmark times each test in a block of its own, so the relative column
of a group compares blocks run minutes apart; `loft bench` (P1, P2) measures
the same workloads interleaved, and its ratios are the ones to quote.
"""
import pytest

from loft_kernels.benchmarks import workloads as W
from loft_kernels.benchmarks.shapes import block_convs

SHAPES = block_convs()
IDS = [f"{s.c_out}@{s.size}" for s in SHAPES]


def fwd_bwd_flops(shape, fraction=1.0):
    return int(3 * shape.flops() * fraction)  # forward, input gradient, weight gradient


@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_partial_conv2d(backend, device, run, shape, side):
    run(W.partial_setup([shape], device, side), f"conv {shape.c_out}@{shape.size} {side}", backend=backend,
        subset=f"1/{W.WORKERS} {side}", flops=fwd_bwd_flops(shape, 1 / W.WORKERS))


@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_sliced_conv_baseline(run, device, shape, side):
    run(W.sliced_setup([shape], device, side=side), f"conv {shape.c_out}@{shape.size} {side}",
        baseline="conv on the sliced weight" + (" and input" if side == "in" else ""),
        flops=fwd_bwd_flops(shape, 1 / W.WORKERS))


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_index_select_conv_baseline(run, device, shape):
    run(W.obvious_setup([shape], device), f"conv {shape.c_out}@{shape.size} out",
        baseline="F.conv2d(x, w.index_select(0, rows))", flops=fwd_bwd_flops(shape, 1 / W.WORKERS))


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_grouped_sliced_baseline(run, device, shape):
    run(W.sliced_setup([shape], device, W.WORKERS), f"grouped {shape.c_out}@{shape.size}", rounds=3,
        baseline=f"{W.WORKERS} convs on sliced weights", flops=fwd_bwd_flops(shape))


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_dense_conv_baseline(run, device, shape):
    run(W.dense_setup([shape], device), f"conv {shape.c_out}@{shape.size} out", baseline="dense conv",
        flops=fwd_bwd_flops(shape))


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_masked_conv_baseline(run, device, shape):
    run(W.masked_setup([shape], device), f"conv {shape.c_out}@{shape.size} out", baseline="weight * mask conv",
        flops=fwd_bwd_flops(shape))


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_grouped_partial_conv2d(backend, device, run, shape):
    run(W.grouped_setup([shape], device), f"grouped {shape.c_out}@{shape.size}", rounds=3, backend=backend,
        groups=W.WORKERS, flops=fwd_bwd_flops(shape))


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_grouped_loop_baseline(backend, device, run, shape):
    run(W.grouped_setup([shape], device, loop=True), f"grouped {shape.c_out}@{shape.size}", rounds=3,
        backend=backend,
        baseline=f"loop of {W.WORKERS} partial_conv2d", flops=fwd_bwd_flops(shape))
