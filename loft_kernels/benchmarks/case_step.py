"""P6: LoFT worker steps against the true floor, the same sub-model physically sliced into a smaller network.

P6a / P6b: one LoFT-4 worker step (forward + backward + SGD) of PreActResNet-18
on a batch of 32 fresh 32x32 inputs, policy "all" / "paper": rank 0 of 4 as
`LoftOptimizer` runs it (its compact sub-model), against the network
`prune(model, groups, 1 - 1/4)` builds (an ordinary nn model of the same
shapes) stepped by the same SGD. Extra columns: the dense step and the old
"dense x FLOP share" yardstick, which not even the sliced network reaches.
P6c: `LoftSimulator` with 4 workers, one step of every worker, against four
sliced sub-model steps.
P6m / P6s: memory of the worker against the sliced network (exact byte counts,
not timings): gradients + optimizer state, and the tensors saved for backward.
Parameters are reported too: the worker holds its compact tensors plus the
full-size masters it writes back at the sync.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..models import preact_resnet18
from ..tickets.flops import count_params_flops
from ..tickets.prune import prune
from ..training.exchange import InProcessExchange
from ..training.groups import convert
from ..training.optimizer import LoftOptimizer
from ..training.simulator import LoftSimulator
from .result import Config, Result, Spec, failed, timed, valued
from .shapes import BATCH, RESOLUTION
from .timing import interleaved

WORKERS = 4
NEVER = 1 << 30  # sync_every: the benchmark times local steps only

P6 = (
    Spec("P6a", "LoFT-4 worker step (fwd+bwd+SGD), PreActResNet-18, batch 32, policy all",
         "the sliced sub-model's step", 1.05, "ratio <= 1.05"),
    Spec("P6b", "LoFT-4 worker step (fwd+bwd+SGD), PreActResNet-18, batch 32, policy paper",
         "the sliced sub-model's step", 1.05, "ratio <= 1.05"),
    Spec("P6c", "LoftSimulator S=4, one step of every worker, policy all",
         "four sliced sub-model steps", 1.05, "ratio <= 1.05"),
    Spec("P6m", "LoFT-4 worker gradient + optimizer-state bytes, policy all",
         "the sliced sub-model's", 1.05, "ratio <= 1.05"),
    Spec("P6s", "LoFT-4 worker bytes saved for backward, policy all",
         "the sliced sub-model's", 1.05, "ratio <= 1.05"),
)

_sgd = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=5e-4)


def _batch(device):
    return (torch.randn(BATCH, 3, RESOLUTION, RESOLUTION, device=device),
            torch.randint(0, 10, (BATCH,), device=device))


def sgd_step(model: nn.Module, opt, x, y) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _step_setup(model, opt, device):
    def setup():
        x, y = _batch(device)
        return lambda: sgd_step(model, opt, x, y)
    return setup


def _variants(policy: str, device) -> dict:
    """dense model + SGD, LoFT-4 rank 0 + LoftOptimizer, sliced sub-model + SGD (same initial weights)."""
    torch.manual_seed(0)
    dense = preact_resnet18(num_classes=10).to(device).train()
    example = torch.randn(2, 3, RESOLUTION, RESOLUTION, device=device)
    loft, groups = convert(copy.deepcopy(dense), example, policy=policy)
    sliced = prune(loft, groups, 1 - 1 / WORKERS)[0].train()
    opt = LoftOptimizer(_sgd(loft.parameters()), loft, groups, sync_every=NEVER,
                        exchange=InProcessExchange(WORKERS).rank(0))
    return {"dense": (dense, _sgd(dense.parameters())), "loft": (loft, opt),
            "sliced": (sliced, _sgd(sliced.parameters())), "groups": groups, "example": example}


def saved_bytes(run) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `run()` runs."""
    saved, seen = [0], set()

    def pack(t):
        # the same tensor saved twice counts once; two slices of one buffer are two tensors
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            saved[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return saved[0]


def step_memory(model: nn.Module, opt, device) -> dict:
    """Exact bytes of one step: parameters (+ full-size masters), gradients, optimizer state, saved activations."""
    x, y = _batch(device)
    opt.zero_grad(set_to_none=True)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    saved = saved_bytes(lambda: losses.append(F.cross_entropy(model(x), y)))
    losses[0].backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    masters = [e.master for e in opt.worker.entries] if getattr(opt, "worker", None) is not None else []
    out = {"parameters": nbytes(model.parameters()), "masters": nbytes(masters),
           "gradients": nbytes(p.grad for p in model.parameters() if p.grad is not None),
           "optimizer_state": nbytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)),
           "saved_activations": saved}
    # CPU: the step's peak as accounted (everything above is alive when the backward starts);
    # CUDA: what the allocator really reached.
    out["peak"] = torch.cuda.max_memory_allocated(device) if cuda else sum(out.values())
    return out


def _worker_row(spec: Spec, policy: str, cfg: Config) -> tuple[Result, dict]:
    dev = cfg.device
    v = _variants(policy, dev)
    reps = cfg.reps(full=10, quick=2)
    t = interleaved({name: _step_setup(*v[name], dev) for name in ("loft", "sliced", "dense")},
                    reps, warmup=cfg.warmup, device=dev)
    share = count_params_flops(v["sliced"][0], v["example"])["flops"] / \
        count_params_flops(v["dense"][0], v["example"])["flops"]
    memory = {name: step_memory(*v[name], dev) for name in ("dense", "loft", "sliced")}
    row = timed(spec, t, "loft", "sliced", repeats=reps, groups=len(v["groups"]),
                vs_dense=round(t.ratio("loft", "dense"), 4), sliced_vs_dense=round(t.ratio("sliced", "dense"), 4),
                vs_dense_flop_share=round(t.ratio("loft", "dense", share), 4), flop_share=round(share, 4),
                memory=memory,
                note=f"{len(v['groups'])} groups; dense-relative time {t.ratio('loft', 'dense'):.3f}, "
                     f"sliced/dense {t.ratio('sliced', 'dense'):.3f}, vs dense x FLOP share "
                     f"{t.ratio('loft', 'dense', share):.2f}")
    return row, memory


def _simulator_row(cfg: Config) -> Result:
    dev = cfg.device
    v = _variants("all", dev)
    torch.manual_seed(0)
    full, groups = convert(preact_resnet18(num_classes=10).to(dev).train(), v["example"], policy="all")
    sim = LoftSimulator(full, groups, _sgd, workers=WORKERS, sync_every=NEVER)
    sliced, sliced_opt = v["sliced"]

    def sim_setup():
        batches = [_batch(dev) for _ in range(WORKERS)]
        return lambda: sim.step(batches, F.cross_entropy)

    def sliced_setup():
        batches = [_batch(dev) for _ in range(WORKERS)]
        return lambda: [sgd_step(sliced, sliced_opt, x, y) for x, y in batches]
    reps = cfg.reps(full=6, quick=2)
    t = interleaved({"sim": sim_setup, "sliced": sliced_setup}, reps, warmup=cfg.warmup, device=dev)
    return timed(P6[2], t, "sim", "sliced", repeats=reps)


def p6(cfg: Config) -> list[Result]:
    rows = []
    memory = None
    for spec, policy in ((P6[0], "all"), (P6[1], "paper")):
        try:
            row, mem = _worker_row(spec, policy, cfg)
            rows.append(row)
            memory = mem if policy == "all" else memory
        except Exception as exc:  # one failing case still reports every row
            rows.append(failed(spec, f"{type(exc).__name__}: {exc}"))
    try:
        rows.append(_simulator_row(cfg))
    except Exception as exc:
        rows.append(failed(P6[2], f"{type(exc).__name__}: {exc}"))
    if memory is None:
        rows += [failed(P6[3], "the policy 'all' worker could not be measured"),
                 failed(P6[4], "the policy 'all' worker could not be measured")]
    else:
        w, s = memory["loft"], memory["sliced"]
        rows.append(valued(P6[3], w["gradients"] + w["optimizer_state"], s["gradients"] + s["optimizer_state"],
                           unit="bytes", note=f"parameters held: {w['parameters'] / 2**20:.1f} MiB compact + shared, "
                                f"{w['masters'] / 2**20:.1f} MiB full-size masters; sliced "
                                f"{s['parameters'] / 2**20:.1f} MiB; step peak (MiB) dense "
                                f"{memory['dense']['peak'] / 2**20:.0f}, worker {w['peak'] / 2**20:.0f}, "
                                f"sliced {s['peak'] / 2**20:.0f}", memory=memory))
        rows.append(valued(P6[4], w["saved_activations"], s["saved_activations"], unit="bytes",
                           note=f"dense saves {memory['dense']['saved_activations'] / 2**20:.1f} MiB"))
    return rows


CASES = {"P6": (P6, p6)}
