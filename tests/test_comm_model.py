"""lk.comm_cost: hand-computed small cases for every method, the paper's GPipe cuts, and LoFT
against the comm_stats of a real 2-process gloo run."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import loft_kernels as lk
from loft_kernels.comm_model import comm_cost, natural_stages


class Chain(nn.Module):
    """Three resolutions (8x8, 4x4, 2x2) and a head; parameters 36, 144, 288, 1152, 130 = 1750 floats."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.stage1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False), nn.ReLU())
        self.stage3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.head = nn.Linear(64, 2)

    def forward(self, x):
        return self.head(torch.flatten(self.stage3(self.stage2(self.stage1(self.stem(x)))), 1))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv2(F.relu(self.bn(self.conv1(x))))


class OneGroup(nn.Module):
    """One filter group block.conv1 -> block.bn -> block.conv2 (n = 6); shared: stem (36) + head (10)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.block = Block()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.block(self.stem(x)), 1).flatten(1))


X = torch.randn(3, 1, 8, 8)


def block_group(model):
    return [g for g in lk.find_filter_groups(model, X) if g.name == "block.conv1"]


# ------------------------------------------------------------------ gpipe ----
def test_gpipe_two_stages_by_hand():
    # natural stages: [stem, stage1] at 8x8, [stage2] at 4x4, [stage3, head] at 2x2; 2 devices: floor(3/2) = 1,
    # so the cut is before stage2.0 and carries its input, 4 x 8 x 8 fp32 = 1024 bytes per sample each way
    c = comm_cost(Chain(), X, "gpipe", 2, 4, 10)
    assert c.details["cut_before"] == ["stage2.0"]
    assert c.details["boundary_bytes_per_sample"] == [1024]
    assert c.total_bytes == 2 * 1024 * 10
    assert c.per_rank_bytes == 1024 * 10
    assert c.details["stage_params"] == [36 + 144, 288 + 1152 + 130]


def test_gpipe_three_stages_by_hand():
    c = comm_cost(Chain(), X, "gpipe", 3, 4, 10)
    assert c.details["cut_before"] == ["stage2.0", "stage3"]
    assert c.details["boundary_bytes_per_sample"] == [1024, 8 * 4 * 4 * 4]
    assert c.total_bytes == 2 * (1024 + 512) * 10
    # the middle device sends 512 forward and 1024 of gradients backward per sample
    assert c.per_rank_bytes == (512 + 1024) * 10


def test_gpipe_balance_params_by_hand():
    # prefix sums of 36, 144, 0, 288, 0, 1152, 130: the smallest largest stage is 1282, reached first by a
    # cut before the ReLU stage2.1 (468 | 1282), which carries 8 x 4 x 4 fp32 = 512 bytes per sample
    c = comm_cost(Chain(), X, "gpipe", 2, 4, 10, balance="params")
    assert c.details["cut_before"] == ["stage2.1"]
    assert c.details["stage_params"] == [468, 1282]
    assert c.total_bytes == 2 * 512 * 10


def test_gpipe_one_worker_and_too_many_workers():
    assert comm_cost(Chain(), X, "gpipe", 1, 4, 10).total_bytes == 0
    with pytest.raises(ValueError, match="workers=4.*3 natural stage"):
        comm_cost(Chain(), X, "gpipe", 4, 4, 10)
    assert comm_cost(Chain(), X, "gpipe", 4, 4, 10, balance="params").workers == 4


def test_gpipe_preact_resnet34_reproduces_the_papers_ratio():
    model = lk.preact_resnet34(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    two = comm_cost(model, x, "gpipe", 2, 128, 50_000)
    four = comm_cost(model, x, "gpipe", 4, 128, 50_000)
    assert two.details["cut_before"] == ["layer3.0"]
    assert four.details["cut_before"] == ["layer2.0", "layer3.0", "layer4.0"]
    per_sample = {64: 64 * 32 * 32 * 4, 128: 128 * 16 * 16 * 4, 256: 256 * 8 * 8 * 4}  # stage outputs, fp32
    assert two.total_bytes == 2 * per_sample[128] * 50_000
    assert four.total_bytes == 2 * sum(per_sample.values()) * 50_000
    assert four.total_bytes / two.total_bytes == pytest.approx(461.60 / 131.88, rel=1e-3)


def test_gpipe_vgg_cuts_after_a_pool():
    model = lk.vgg11(num_classes=10)
    c = comm_cost(model, torch.randn(1, 3, 32, 32), "gpipe", 2, 128, 1)
    # VGG11 has five resolutions (32, 16, 8, 4, 2); device 1 starts at the 8x8 stage, i.e. at the conv
    # after the second max-pool, and receives that pool's output: 128 x 8 x 8 fp32
    assert c.details["cut_before"] == ["features.8"]
    assert c.details["boundary_bytes_per_sample"] == [128 * 8 * 8 * 4]


def test_natural_stages_ignores_parameter_free_downsampling():
    from loft_kernels.comm_model import _Unit
    units = [_Unit("conv", 10, 4, 64), _Unit("pool", 0, 4, 16), _Unit("conv2", 10, 4, 16), _Unit("fc", 5, 4, None)]
    assert natural_stages(units) == [0, 0, 1, 1]


def test_gpipe_leaves_the_model_as_it_was():
    model = lk.preact_resnet(depths=(1, 1, 1, 1), width=0.125)
    model.train()
    model.layer1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    comm_cost(model, torch.randn(2, 3, 16, 16), "gpipe", 2, 4, 10)
    assert model.training and not model.layer1.training and model.layer2.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_gpipe_measures_the_dense_model_of_a_loft_worker():
    model = lk.preact_resnet(depths=(1, 1, 1, 1), width=0.25)
    x = torch.randn(2, 3, 16, 16)
    plain = comm_cost(model, x, "gpipe", 4, 4, 10)
    model, groups = lk.convert(model, x, loft_layers=True)
    lk.activate(model, groups, {g.name: torch.arange(g.n // 2) for g in groups})
    assert comm_cost(model, x, "gpipe", 4, 4, 10).total_bytes == plain.total_bytes


# -------------------------------------------------------- ddp / local SGD ----
def test_ddp_by_hand():
    # 1750 fp32 parameters = 7000 bytes; 20 samples, 2 workers x batch 4 -> ceil(20 / 8) = 3 steps;
    # ring all_reduce: each rank sends 2 (S-1)/S x 7000 = 7000 bytes per step
    c = comm_cost(Chain(), X, "ddp", 2, 4, 20)
    assert (c.events, c.per_rank_bytes, c.total_bytes) == (3, 3 * 7000, 2 * 3 * 7000)
    # 3 workers: ceil(20 / 12) = 2 steps, floor(2 * 2 / 3 * 7000) = 9333 bytes per step and rank
    c = comm_cost(Chain(), X, "ddp", 3, 4, 20)
    assert (c.events, c.per_rank_bytes, c.total_bytes) == (2, 2 * 9333, 3 * 2 * 9333)


def test_localsgd_by_hand_and_frozen_parameters():
    # 3 steps, sync every 2 -> 2 syncs (the last one partial) of the 7000 parameter bytes
    c = comm_cost(Chain(), X, "localsgd", 2, 4, 20, sync_every=2)
    assert (c.events, c.per_rank_bytes, c.total_bytes) == (2, 2 * 7000, 2 * 2 * 7000)
    model = Chain()
    model.head.requires_grad_(False)  # 130 frozen floats: no gradient to reduce, but still a parameter
    assert comm_cost(model, X, "ddp", 2, 4, 20).per_rank_bytes == 3 * (7000 - 520)
    assert comm_cost(model, X, "localsgd", 2, 4, 20, sync_every=2).per_rank_bytes == 2 * 7000
    assert comm_cost(Chain(), X, "ddp", 1, 4, 20).total_bytes == 0


# ------------------------------------------------------------------- loft ----
@pytest.mark.parametrize("workers, state, per_sync", [
    # shared: stem 36 + head 10 floats = 184 bytes (all_reduce mean) and bn.num_batches_tracked 8 bytes
    # (all_reduce max); a filter: conv1 row 36 + bn weight, bias, mean, var 4 + conv2 column 36 = 76 floats.
    # S=2: 3 filters each -> gather 2 x 912 bytes, a rank sends half; all_reduces send (184 + 8) x 2 x 1/2.
    (2, "reset", 192 + 912),
    # S=4: 2, 2, 1, 1 filters padded to 2 (608 bytes), a rank sends 3/4 of 4 x 608; all_reduces x 3/2.
    (4, "reset", 288 + 1824),
    # keep (SGD momentum): + 46 shared floats in the mean all_reduce, + 74 trainable floats per filter.
    (2, "keep", 376 + 1800),
    (4, "keep", 564 + 3600),
])
def test_loft_by_hand(workers, state, per_sync):
    model = OneGroup()
    # 20 samples at batch 4: ceil(20 / (4 S)) steps, sync every 2 -> S=2: 3 steps, 2 syncs; S=4: 2 steps, 1 sync
    syncs = {2: 2, 4: 1}[workers]
    c = comm_cost(model, X, "loft", workers, 4, 20, sync_every=2, state=state, groups=block_group(model))
    assert c.events == syncs
    assert c.per_rank_bytes == syncs * per_sync
    assert c.total_bytes == workers * syncs * per_sync
    assert c.details["groups"] == ["block.conv1"]


def test_loft_default_groups_and_policy():
    model = OneGroup()
    # policy "all" finds both groups (stem -> block.conv1 is one too), so more bytes are partitioned
    every = comm_cost(model, X, "loft", 2, 4, 8)
    assert every.details["groups"] == ["stem", "block.conv1"]
    with pytest.raises(ValueError, match="paper"):
        comm_cost(model, X, "loft", 2, 4, 8, policy="paper")


def _gloo_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = {}
        for state in ("reset", "keep"):
            torch.manual_seed(0)
            model, groups = lk.convert(OneGroup(), X)
            opt = lk.LoftOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, groups,
                                   sync_every=2, state=state)
            torch.manual_seed(1 + rank)  # each worker its own data
            for _ in range(5):  # 5 steps at K = 2: syncs after steps 2 and 4, and the partial round at finalize
                opt.zero_grad()
                F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.randint(0, 2, (4,))).backward()
                opt.step()
            opt.finalize()
            result[state] = opt.comm_stats()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_loft_equals_comm_stats_of_a_real_two_process_run(tmp_path):
    mp.start_processes(_gloo_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    model, groups = lk.convert(OneGroup(), X)
    for rank in range(2):
        stats = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for state in ("reset", "keep"):
            # 5 steps of 2 workers x batch 4 = 40 samples
            c = comm_cost(model, X, "loft", 2, 4, 40, sync_every=2, state=state, groups=groups)
            assert stats[state]["syncs"] == c.events == 3
            assert stats[state]["bytes_sent"] == c.per_rank_bytes
            assert stats[state]["bytes_received"] == c.per_rank_bytes


# -------------------------------------------------------------- bad input ----
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(model="net"), TypeError, "model"),
    (dict(example_input=[1.0]), TypeError, "example_input"),
    (dict(example_input=torch.ones(3, dtype=torch.long)), TypeError, "example_input"),
    (dict(example_input=torch.ones(3)), ValueError, "example_input"),
    (dict(method=1), TypeError, "method"),
    (dict(method="pipedream"), ValueError, "method"),
    (dict(workers=0), ValueError, "workers"),
    (dict(workers=2.0), TypeError, "workers"),
    (dict(batch_size=True), TypeError, "batch_size"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(samples=0), ValueError, "samples"),
    (dict(sync_every=0), ValueError, "sync_every"),
    (dict(state="carry"), ValueError, "state"),
    (dict(balance="flops"), ValueError, "balance"),
])
def test_bad_input(kwargs, exc, match):
    args = dict(model=Chain(), example_input=X, method="ddp", workers=2, batch_size=4, samples=10)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        comm_cost(**args)


def test_loft_groups_that_do_not_fit_the_workers():
    model = OneGroup()
    with pytest.raises(ValueError, match="groups"):
        comm_cost(model, X, "loft", 8, 4, 10, groups=block_group(model))  # n = 6 < 8 workers


# ------------------------------------------------------- loft, new kinds ----
class DepthwiseGroup(nn.Module):
    """stem -> pw1 -> bn1 -> relu6 -> dw -> bn2 -> relu6 -> pw2 -> pool -> head; the pw1 group has n = 6."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.pw1, self.bn1 = nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.dw, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6)
        self.pw2 = nn.Conv2d(6, 4, 1, bias=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.pw1(self.stem(x)))))))
        return self.head(F.adaptive_avg_pool2d(self.pw2(x), 1).flatten(1))


class LinearGroup(nn.Module):
    """stem -> spatial mean -> fc1 -> gelu -> fc2: the fc1 group has n = 6 (Linear producer and consumer)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.stem(x).mean((2, 3)))))


@pytest.mark.parametrize("model_cls, group_name, per_sync", [
    # shared: stem 36 + head 10 floats = 184 bytes (mean), two num_batches_tracked = 16 bytes (max); a filter:
    # pw1 row 4 + bn1 4 + dw kernel 9 + bn2 4 + pw2 column 4 = 25 floats; 3 per rank -> a rank sends 300 bytes.
    (DepthwiseGroup, "pw1", 184 + 16 + 300),
    # shared: stem 36 + fc2 bias 2 floats = 152 bytes (mean), no counters; a filter: fc1 row 4 + fc1 bias 1 +
    # fc2 column 2 = 7 floats; 3 per rank -> a rank sends 84 bytes.
    (LinearGroup, "fc1", 152 + 84),
])
def test_loft_by_hand_new_kinds(model_cls, group_name, per_sync):
    model = model_cls()
    groups = [g for g in lk.find_filter_groups(model, X) if g.name == group_name]
    assert len(groups) == 1 and groups[0].n == 6
    c = comm_cost(model, X, "loft", 2, 4, 16, sync_every=2, state="reset", groups=groups)  # 2 steps, 1 sync
    assert c.events == 1 and c.per_rank_bytes == per_sync and c.total_bytes == 2 * per_sync


@pytest.mark.parametrize("name", ["mobilenet_v2", "convnext_cifar"])
def test_every_method_on_the_new_zoo_models(name):
    model, x = lk.get_model(name, width=0.125), torch.randn(2, 3, 32, 32)
    costs = {m: comm_cost(model, x, m, 2, 8, 64, sync_every=2) for m in ("ddp", "localsgd", "gpipe", "loft")}
    assert all(c.total_bytes > 0 for c in costs.values())
    # LoFT sends each partitioned filter once (gathered) instead of all-reducing it: less than local SGD.
    assert costs["loft"].total_bytes < costs["localsgd"].total_bytes
    assert costs["loft"].details["groups"] == [g.name for g in lk.find_filter_groups(model, x)]
