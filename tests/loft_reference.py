"""Test helpers: a plainly written LoFT reference, shared fixtures, and the distributed worker entry point.

The reference implements the LoFT round (partition, dispatch, K local steps,
sync) the obvious way and shares no code with loft_kernels.training beyond the
partition rule: every round each worker gets a deep copy of the full model *physically sliced* to its filters
(smaller nn.Conv2d / nn.Linear / nn.BatchNorm2d modules; a depthwise member
becomes a depthwise conv over the owned channels), its own optimizer, and trains K
steps; the sync averages shared tensors (max for integer buffers) and writes
each worker's slices back by index.
"""
from __future__ import annotations

import copy
import functools
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loft_kernels as lk
from loft_kernels.training.partition import partition


# ------------------------------------------------------------ fixtures ----
@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and a shared 2-core machine is not oversubscribed."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_preact(seed: int = 0):
    """PreActResNet with one block per stage; width 0.1 gives groups of 6, 13, 26, 51 filters (uneven splits)."""
    torch.manual_seed(seed)
    model = lk.preact_resnet((1, 1, 1, 1), num_classes=5, width=0.1)
    return lk.convert(model, torch.randn(2, 3, 8, 8))


def tiny_vgg(seed: int = 0):
    """VGG-BN whose middle conv is conv_b of one group and conv_a of the next (a chain); groups of 6 and 13."""
    torch.manual_seed(seed)
    model = lk.vgg(width=0.1, num_classes=5)
    return lk.convert(model, torch.randn(2, 3, 8, 8))


def tiny_mobilenet(seed: int = 0):
    """MobileNetV2 blocks (expand -> bn -> relu6 -> depthwise -> bn -> relu6 -> project): groups of 8, 32, 48."""
    from loft_kernels.models_modern import MobileNetV2
    torch.manual_seed(seed)
    model = MobileNetV2(num_classes=5, width=0.25, cfg=((1, 8, 1, 1), (4, 12, 2, 2)))
    return lk.convert(model, torch.randn(2, 3, 8, 8))


def tiny_convnext(seed: int = 0):
    """ConvNeXt-style blocks whose channels-last MLPs (Linear -> GELU -> Linear) are groups of 32 and 64."""
    from loft_kernels.models_modern import ConvNeXt
    torch.manual_seed(seed)
    model = ConvNeXt(depths=(1, 1), dims=(8, 16), num_classes=5, layer_scale=1.0)
    return lk.convert(model, torch.randn(2, 3, 8, 8), loft_layers=True)


def tiny_gated(factory):
    """A model of tests/gate_models.py (SE gates, grouped convs) with its discovered groups."""
    def make(seed: int = 0):
        torch.manual_seed(seed)
        model = factory()
        return model, lk.find_filter_groups(model, torch.randn(2, 3, 8, 8))
    return make


def _gate_models():
    from gate_models import TinyEfficientNet, TinyResNeXt
    return {"efficientnet_se": tiny_gated(TinyEfficientNet), "regnet_y": tiny_gated(lambda: TinyResNeXt(se=True))}


MODELS = {"preact": tiny_preact, "vgg": tiny_vgg, "mobilenet": tiny_mobilenet, "convnext": tiny_convnext,
          **_gate_models()}
OPTIMIZERS = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adam": functools.partial(torch.optim.Adam, lr=1e-2),
}


def batch(worker: int, step: int, seed: int = 0, n: int = 4, shape=(3, 8, 8), classes: int = 5):
    """The (inputs, targets) of `worker` at global step `step`: reproducible in any process."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + worker * 10_007 + step)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


loss_fn = F.cross_entropy


# ----------------------------------------------------------- reference ----
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _indices(groups, owned):
    """module name -> index sets: out rows (producer, SE expand), in columns (consumer, SE reduce), norm
    channels, depthwise channels."""
    rows, cols, chans, depthwise = {}, {}, {}, {}
    kinds = {"batchnorm": chans, "depthwise": depthwise, "se_reduce": cols, "se_expand": rows}
    for g in groups:
        rows[g.producer] = owned[g.name]
        cols[g.consumer] = owned[g.name]
        for m in g.members:
            kinds[m.kind][m.name] = owned[g.name]
    return rows, cols, chans, depthwise


def in_block(layer, cols):
    """A grouped conv's weight holds one conv group's input channels: the in-block positions of `cols`, which must
    be the same in every conv group (the aligned partition)."""
    if not isinstance(layer, nn.Conv2d) or layer.groups == 1 or cols is None:
        return cols
    block = layer.in_channels // layer.groups
    local = torch.unique(cols % block)
    want = (torch.arange(layer.groups)[:, None] * block + local[None, :]).reshape(-1)
    assert torch.equal(cols.sort().values, want), "the owned channels are not aligned across conv groups"
    return local


def tensor_index(name: str, groups, owned, full=None):
    """(rows, cols) of a full-model tensor that is sliced for a worker, or None if it is shared.

    `full` (the model) is needed for grouped convs, whose columns are in-block positions."""
    rows, cols, chans, depthwise = _indices(groups, owned)
    module, _, attr = name.rpartition(".")
    if module in chans and attr in ("weight", "bias", "running_mean", "running_var"):
        return chans[module], None
    if module in depthwise and attr in ("weight", "bias"):
        return depthwise[module], None
    if module in rows or module in cols:
        if attr == "weight":
            c = cols.get(module)
            return rows.get(module), c if full is None else in_block(full.get_submodule(module), c)
        if attr == "bias" and module in rows:
            return rows[module], None
    return None


def _take(t, rows, cols):
    if rows is not None:
        t = t[rows]
    if cols is not None:
        t = t[:, cols]
    return t.clone()


def _put(t, rows, cols, value):
    r = rows if rows is not None else torch.arange(t.shape[0])
    if cols is None:
        t[r] = value
    else:
        t[r[:, None], cols[None, :]] = value


def sub_model(full: nn.Module, groups, owned) -> nn.Module:
    """A deep copy of `full` with every group physically sliced to the worker's `owned` filters."""
    sub = copy.deepcopy(full)
    rows, cols, chans, depthwise = _indices(groups, owned)
    for name in set(rows) | set(cols):
        old = sub.get_submodule(name)
        if isinstance(old, nn.Linear):
            r = rows.get(name, torch.arange(old.out_features))
            c = cols.get(name, torch.arange(old.in_features))
            new = nn.Linear(len(c), len(r), bias=old.bias is not None)
        else:
            r = rows.get(name, torch.arange(old.out_channels))
            c = cols.get(name, torch.arange(old.in_channels))
            new = nn.Conv2d(len(c), len(r), old.kernel_size, old.stride, old.padding, old.dilation, old.groups,
                            bias=old.bias is not None, padding_mode=old.padding_mode)
            c = in_block(old, c)
        with torch.no_grad():
            new.weight.copy_(old.weight[r][:, c])
            if old.bias is not None:
                new.bias.copy_(old.bias[r])
        _set_module(sub, name, new)
    for name, idx in depthwise.items():  # depthwise kernel j travels with filter j
        old = sub.get_submodule(name)
        new = nn.Conv2d(len(idx), len(idx), old.kernel_size, old.stride, old.padding, old.dilation, groups=len(idx),
                        bias=old.bias is not None, padding_mode=old.padding_mode)
        with torch.no_grad():
            new.weight.copy_(old.weight[idx])
            if old.bias is not None:
                new.bias.copy_(old.bias[idx])
        _set_module(sub, name, new)
    for name, idx in chans.items():
        old = sub.get_submodule(name)
        new = nn.BatchNorm2d(len(idx), old.eps, old.momentum, old.affine, old.track_running_stats)
        with torch.no_grad():
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if getattr(old, attr) is not None:
                    getattr(new, attr).copy_(getattr(old, attr)[idx])
            if old.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(old.num_batches_tracked)
        _set_module(sub, name, new)
    return sub


def masked_model(full, groups, keep):
    """A copy of `full` with every filter outside keep[group] (indices) zeroed: producer rows and bias, BatchNorm
    affine parameters, depthwise bias. With zero-preserving ops in between it computes what the sliced model does."""
    m = copy.deepcopy(full)
    with torch.no_grad():
        for g in groups:
            kept = set(torch.as_tensor(keep[g.name]).tolist())
            drop = [j for j in range(g.n) if j not in kept]
            producer = m.get_submodule(g.producer)
            producer.weight[drop] = 0
            if producer.bias is not None:
                producer.bias[drop] = 0
            for member in g.members:
                layer = m.get_submodule(member.name)
                if member.kind == "batchnorm":
                    layer.weight[drop] = 0
                    layer.bias[drop] = 0
                elif member.kind == "depthwise" and layer.bias is not None:
                    layer.bias[drop] = 0
    return m


def run_reference(model, groups, factory, workers, sync_every, seed, state, steps, data_seed=0, batches=batch):
    """Train `steps` steps of LoFT; returns the full model's state_dict after every sync (the last: finalize).
    `batches(worker, step, data_seed)` gives the (inputs, targets) of every run_* helper."""
    full = copy.deepcopy(model)
    lk.activate(full, groups, None)
    full.train()
    full_state, scalars = {}, {}  # state="keep": param name -> {key: full-size tensor} / {key: scalar state}
    snapshots, t, rnd = [], 0, 0
    while t < steps:
        k = min(sync_every, steps - t)
        parts = partition(groups, workers, seed, rnd)
        owned = [{g: parts[g][s] for g in parts} for s in range(workers)]
        subs, opts = [], []
        for s in range(workers):
            sub = sub_model(full, groups, owned[s])
            opt = factory(list(sub.parameters()))
            if state == "keep":
                for name, p in sub.named_parameters():
                    st = {key: (v.clone() if torch.is_tensor(v) else v) for key, v in scalars.get(name, {}).items()}
                    idx = tensor_index(name, groups, owned[s], full)
                    for key, v in full_state.get(name, {}).items():
                        st[key] = v.clone() if idx is None else _take(v, *idx)
                    if st:
                        opt.state[p] = st
            subs.append(sub)
            opts.append(opt)
        for i in range(k):
            for s in range(workers):
                x, y = batches(s, t + i, data_seed)
                opts[s].zero_grad()
                loss_fn(subs[s](x), y).backward()
                opts[s].step()
        # sync: shared -> mean (integers: max); sliced -> from each owner
        sub_tensors = [dict(list(sub.named_parameters()) + list(sub.named_buffers())) for sub in subs]
        with torch.no_grad():
            for name, value in list(full.named_parameters()) + list(full.named_buffers()):
                idx0 = tensor_index(name, groups, owned[0], full)
                if idx0 is not None:
                    for s in range(workers):
                        _put(value, *tensor_index(name, groups, owned[s], full), sub_tensors[s][name])
                elif value.is_floating_point():
                    value.copy_(torch.stack([st[name] for st in sub_tensors]).mean(0))
                else:
                    value.copy_(torch.stack([st[name] for st in sub_tensors]).amax(0))
            if state == "keep":
                sub_params = [dict(sub.named_parameters()) for sub in subs]
                for name, p in full.named_parameters():
                    states = [opts[s].state.get(sub_params[s][name], {}) for s in range(workers)]
                    keys = [k_ for k_, v in states[0].items()
                            if torch.is_tensor(v) and v.is_floating_point() and v.shape == sub_params[0][name].shape]
                    scalars[name] = {k_: v for k_, v in states[0].items() if k_ not in keys}
                    idx0 = tensor_index(name, groups, owned[0], full)
                    for key in keys:
                        if idx0 is None:
                            full_state.setdefault(name, {})[key] = torch.stack([st[key] for st in states]).mean(0)
                        else:
                            target = full_state.setdefault(name, {}).setdefault(key, torch.zeros_like(p))
                            for s in range(workers):
                                _put(target, *tensor_index(name, groups, owned[s], full), states[s][key])
        snapshots.append({n: v.clone() for n, v in full.state_dict().items()})
        t += k
        rnd += 1
    return snapshots


def run_simulator(model, groups, factory, workers, sync_every, seed, state, steps, data_seed=0, batches=batch):
    """The same run through lk.LoftSimulator; returns (snapshots after every sync, simulator).

    The loop execution: these comparisons hold it to float32 rounding of one summation order (the batched
    execution's equality to the loop is tested on its own, in test_simulator_batched.py)."""
    sim = lk.LoftSimulator(copy.deepcopy(model), groups, factory, workers, sync_every, seed, state,
                           execution="loop")
    sim.model.train()
    snapshots = []
    for t in range(steps):
        before = sim.round
        sim.step([batches(s, t, data_seed) for s in range(workers)], loss_fn)
        if sim.round != before:
            snapshots.append({n: v.clone() for n, v in sim.model.state_dict().items()})
    if sim.step_in_round:
        sim.finalize()
        snapshots.append({n: v.clone() for n, v in sim.model.state_dict().items()})
    return snapshots, sim


def run_plain(model, groups, factory, steps, data_seed=0, batches=batch):
    """Plain training of a copy of `model` on worker 0's batches (what one LoFT worker must equal); its state."""
    plain = copy.deepcopy(model)
    lk.activate(plain, groups, None)
    plain.train()
    opt = factory(plain.parameters())
    for t in range(steps):
        x, y = batches(0, t, data_seed)
        opt.zero_grad()
        loss_fn(plain(x), y).backward()
        opt.step()
    return plain.state_dict()


def assert_simulator_matches_reference(model, groups, factory, workers, sync_every, seed, state, steps):
    """The simulator's full model equals the plain reference's after every sync; returns the simulator."""
    ref = run_reference(model, groups, factory, workers, sync_every, seed, state, steps)
    sim_snaps, sim = run_simulator(model, groups, factory, workers, sync_every, seed, state, steps)
    assert len(ref) == len(sim_snaps) == -(-steps // sync_every)
    for i, (a, b) in enumerate(zip(ref, sim_snaps)):
        diff, where = max_diff(a, b)
        assert diff <= 1e-5, f"sync {i}: {where} differs by {diff}"
    # the training moved the model: the comparison is not between two untouched copies
    assert max_diff(ref[-1], model.state_dict())[0] > 1e-3
    return sim


def max_diff(a: dict, b: dict) -> tuple[float, str]:
    """Largest abs difference over the state_dict entries (and where), keys must match."""
    assert a.keys() == b.keys()
    worst, where = 0.0, ""
    for k in a:
        d = (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
        if d > worst:
            worst, where = d, k
    return worst, where


# ------------------------------------------------------ kill and resume ----
def train_with_checkpoints(config: dict, ckpt: str, crash_at=None) -> lk.LoftSimulator:
    """Simulated LoFT run that checkpoints (atomically) before every step and resumes from `ckpt` if present.

    crash_at: at that step the process dies (os._exit) halfway through the step, after the
    forward/backward of one worker, as a killed job would.
    """
    model, groups = MODELS[config["model"]]()
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS[config["optimizer"]], config["workers"],
                           config["sync_every"], config["seed"], config["state"], execution="loop")
    sim.model.train()
    start = 0
    if os.path.exists(ckpt):
        saved = lk.load_checkpoint(ckpt)  # weights_only=True
        sim.load_state_dict(saved["sim"])
        start = saved["step"]
    for t in range(start, config["steps"]):
        lk.atomic_save({"sim": sim.state_dict(), "step": t}, ckpt)
        batches = [batch(s, t) for s in range(config["workers"])]
        if t == crash_at:
            loss_fn(sim.worker_models[0](batches[0][0]), batches[0][1]).backward()
            os._exit(1)
        sim.step(batches, loss_fn)
    sim.finalize()
    return sim


# ------------------------------------------------- distributed worker ----
def _rank_model(config: dict, rank: int):
    """The rank's model and groups; `overrides[rank]` may change width or dtype or drop the last group."""
    own = config.get("overrides", {}).get(rank, {})
    if "width" in own:
        torch.manual_seed(0)
        model, groups = lk.convert(lk.preact_resnet((1, 1, 1, 1), num_classes=5, width=own["width"]),
                                   torch.randn(2, 3, 8, 8))
    else:
        model, groups = MODELS[config["model"]]()
    if own.get("double"):
        model.double()
    return model, (groups[:-1] if own.get("drop_group") else groups)


def _poison(model, which: str) -> None:
    """An inf in one gradient: a shared parameter's ("shared") or a partitioned one's ("partitioned")."""
    named = dict(model.named_parameters())
    name = "linear.weight" if which == "shared" else next(n for n in named if n.endswith("conv1.weight")
                                                           and named[n].grad is not None)
    named[name].grad.view(-1)[0] = float("inf")


def dist_worker(rank: int, world: int, init_file: str, out_file: str, config: dict) -> None:
    """One gloo rank of LoftOptimizer training (run in a subprocess); saves its per-sync snapshots to out_file.

    config: model, optimizer, sync_every, seed, state, steps; optional: die_at / stall_at (the step at
    which rank `die_rank` calls os._exit / goes silent, to test the others' error), timeout (seconds),
    overrides {rank: {seed, sync_every, state, width, double, drop_group}} (a misconfigured rank), scaler
    (a GradScaler with scale 2**16), inf_at [rank, step, "shared" | "partitioned"] (an inf gradient),
    autocast ("bfloat16": forward under CPU autocast), cycle (reuse the first `cycle` batches).
    """
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=config.get("timeout", 30)))
    own = {k: v for k, v in config.get("overrides", {}).get(rank, {}).items() if k not in ("width", "double", "drop_group")}
    cfg = {**config, **own}
    model, groups = _rank_model(config, rank)
    model.train()
    result = {"rank": rank, "snapshots": [], "owned": [], "error": None, "elapsed": None, "scales": [],
              "losses": []}
    start = time.monotonic()
    try:
        opt = lk.LoftOptimizer(OPTIMIZERS[cfg["optimizer"]](model.parameters()), model, groups,
                               sync_every=cfg["sync_every"], seed=cfg["seed"], state=cfg["state"])
    except ValueError as exc:  # a configuration that differs across ranks: every rank must say so
        result["error"] = str(exc)
        result["elapsed"] = time.monotonic() - start
        lk.atomic_save(result, out_file)
        dist.destroy_process_group()
        return
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16) if cfg.get("scaler") else None
    result["owned"].append({k: v.clone() for k, v in opt.owned().items()})
    try:
        for t in range(cfg["steps"]):
            if cfg.get("die_at") == t and rank == cfg.get("die_rank", world - 1):
                os._exit(3)  # a crash: no cleanup, no goodbye to the peers
            if cfg.get("stall_at") == t and rank == cfg.get("die_rank", world - 1):
                time.sleep(600)  # alive but silent: the others must time out (the test kills this one)
            x, y = batch(rank, t % cfg.get("cycle", cfg["steps"]))
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.get("autocast") == "bfloat16"):
                loss = loss_fn(model(x), y)
            result["losses"].append(float(loss.detach()))
            (loss if scaler is None else scaler.scale(loss)).backward()
            if cfg.get("inf_at") and cfg["inf_at"][:2] == [rank, t]:
                _poison(model, cfg["inf_at"][2])
            before = opt.round
            start = time.monotonic()
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
                result["scales"].append(scaler.get_scale())
            if opt.round != before:
                result["snapshots"].append({n: v.clone() for n, v in model.state_dict().items()})
                result["owned"].append({k: v.clone() for k, v in opt.owned().items()})
        if opt.step_in_round:
            start = time.monotonic()
            opt.finalize()
            result["snapshots"].append({n: v.clone() for n, v in model.state_dict().items()})
        result["comm"] = opt.comm_stats()
    except RuntimeError as exc:
        result["error"] = str(exc)
        result["elapsed"] = time.monotonic() - start
        lk.atomic_save(result, out_file)
        os._exit(0)  # the group is broken: skip destroy_process_group
    lk.atomic_save(result, out_file)
    dist.destroy_process_group()


if __name__ == "__main__":
    import ast
    if sys.argv[1] == "crash":  # python loft_reference.py crash CKPT STEP 'CONFIG_DICT'
        torch.set_num_threads(1)
        train_with_checkpoints(ast.literal_eval(sys.argv[4]), sys.argv[2], crash_at=int(sys.argv[3]))
    else:  # python loft_reference.py RANK WORLD INIT_FILE OUT_FILE 'CONFIG_DICT'
        dist_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], ast.literal_eval(sys.argv[5]))
