"""Every torchvision family, as a reduced structural model (tests/family_models.py): the filter groups discovery
finds against the groups the family's structure implies, a reason for every other conv/linear, one LoFT-2 step
equal to the physically sliced reference, LoFT with one worker equal to plain training, a 50 % ticket that equals
the masked full model and gives finite [N, 10] logits.

Expected groups are derived from each model's blocks (not from discovery). Two kinds of group are checked
separately per family (the "pending" sets, named for when discovery did not find them): groups whose filters pass
a squeeze-and-excitation gate (the expand conv of MBConv / MobileNetV3 / MaxViT blocks, RegNetY's grouped conv)
and groups through grouped convolutions (ResNeXt, RegNetX, RegNetY).
"""
from __future__ import annotations

import copy
import functools
import os

import family_attention as A
import family_classic as C
import family_cnn as N
import pytest
import torch
from family_models import FAMILIES, SMALL, build, grouped_share, layer_names
from loft_reference import (  # noqa: F401 (one_thread: fixture)
    OPTIMIZERS,
    batch,
    masked_model,
    max_diff,
    one_thread,
    run_plain,
    run_reference,
    run_simulator,
)
from test_prune_kinds import _randomise
from torch import nn

import loft_kernels as lk

pytestmark = pytest.mark.usefixtures("one_thread")
SE, GROUPED = "SE-gated group", "grouped-conv group"


# ------------------------------------------------------------- expected groups ----
def _blocks(model, cls):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def _chain(seq, prefix):
    """(convs in order as (name, conv), SE name) of a block's Sequential; a ConvBNAct counts as its conv."""
    convs, se = [], None
    for key, child in seq.named_children():
        if isinstance(child, N.SqueezeExcitation):
            se = f"{prefix}.{key}"
        elif isinstance(child, N.ConvBNAct):
            convs.append((f"{prefix}.{key}.0", child[0]))
        elif isinstance(child, nn.Conv2d):
            convs.append((f"{prefix}.{key}", child))
    return convs, se


def _unit(name, module, attr):
    """A conv (ConvBNAct or bare) or an inverted-residual block: its convs, SE, and whether it adds its input."""
    if isinstance(module, (N.ConvBNAct, nn.Conv2d)):
        conv = module[0] if isinstance(module, N.ConvBNAct) else module
        return dict(convs=[(f"{name}.0" if conv is not module else name, conv)], se=None, residual=False)
    convs, se = _chain(getattr(module, attr), f"{name}.{attr}")
    residual = getattr(module, "use_res_connect", getattr(module, "apply_residual", None))
    return dict(convs=convs, se=se, residual=isinstance(module, A.MaxVitMBConv) if residual is None else residual)


def _mobile(units):
    """today, pending for a sequence of units in forward order. Inside a block: SE fc1 -> fc2, expand -> (depthwise)
    -> project, a fused block's two convs. Between units: the last conv of a unit that adds no input flows into the
    next unit alone unless that one adds its input: into its first conv, or through its depthwise conv into the
    conv after it. A group whose filters pass an SE gate is pending."""
    today, pending = set(), {SE: set()}
    for u in units:
        convs, se = u["convs"], u["se"]
        if se:
            today.add((f"{se}.fc1", f"{se}.fc2"))
        if len(convs) == 3 and convs[0][1].groups == 1:  # expand -> depthwise -> project
            (pending[SE] if se else today).add((convs[0][0], convs[2][0]))
        elif len(convs) == 2 and convs[0][1].groups == convs[1][1].groups == 1:  # fused expand -> project
            today.add((convs[0][0], convs[1][0]))
    for u, v in zip(units, units[1:]):
        if u["residual"] or v["residual"]:
            continue
        first = v["convs"][0]
        if first[1].groups == 1:
            today.add((u["convs"][-1][0], first[0]))
        else:
            (pending[SE] if v["se"] else today).add((u["convs"][-1][0], v["convs"][1][0]))
    return today, pending


def _units(children, blocks, attr):
    """Units in forward order from (name, module) pairs; stage Sequentials of `blocks` are flattened."""
    out = []
    for name, child in children:
        if isinstance(child, nn.Sequential) and not isinstance(child, N.ConvBNAct) and \
                all(isinstance(c, blocks) for c in child):
            out += [_unit(f"{name}.{k}", c, attr) for k, c in child.named_children()]
        elif isinstance(child, blocks + (N.ConvBNAct, nn.Conv2d)):
            out.append(_unit(name, child, attr))
    return out


def _features(model, blocks, attr="block", extra=()):
    today, pending = _mobile(_units([(f"features.{k}", c) for k, c in model.features.named_children()], blocks,
                                    attr))
    return today | set(extra), pending


def _mnasnet(model):
    """The stem conv -> depthwise -> 1x1 is a group; from that 1x1 on, the stacks are units."""
    today, pending = _mobile(_units([(f"layers.{i}", c) for i, c in enumerate(model.layers) if i >= 6],
                                    (N._InvertedResidualMnas,), "layers"))
    return today | {("layers.0", "layers.6")}, pending


def _pairs(prefix, names):
    return {(f"{prefix}{a}", f"{prefix}{b}") for a, b in zip(names, names[1:])}


def _resnet(model):
    today, grouped = set(), set()
    for n, b in _blocks(model, (N.BasicBlock, N.Bottleneck)):
        pairs = _pairs(f"{n}.", ["conv1", "conv2"] + (["conv3"] if isinstance(b, N.Bottleneck) else []))
        (grouped if isinstance(b, N.Bottleneck) and b.conv2.groups > 1 else today).update(pairs)
    return today, {GROUPED: grouped}


def _regnet(model):
    today, pending = set(), {GROUPED: set(), SE: set()}
    for n, b in _blocks(model, N.ResBottleneckBlock):
        pending[GROUPED].add((f"{n}.f.a.0", f"{n}.f.b.0"))
        if hasattr(b.f, "se"):
            today.add((f"{n}.f.se.fc1", f"{n}.f.se.fc2"))
        pending[SE if hasattr(b.f, "se") else GROUPED].add((f"{n}.f.b.0", f"{n}.f.c.0"))
    return today, pending


def _sequential_convs(model, cls, prefix=""):
    """Consecutive groups=1 convs of every `cls` Sequential (inception branches, VGG/AlexNet features)."""
    out = set()
    for n, seq in _blocks(model, cls):
        names = [k for k, c in seq.named_children() if isinstance(c, (nn.Conv2d, C.BasicConv2d))]
        suffix = ".conv" if all(isinstance(seq.get_submodule(k), C.BasicConv2d) for k in names) else ""
        out |= {(f"{n}.{a}{suffix}", f"{n}.{b}{suffix}") for a, b in zip(names, names[1:])}
    return out


def _inception(model):
    seqs = {(a, b) for a, b in _sequential_convs(model, nn.Sequential) if "branch" in a}
    dbl = {(f"{n}.branch3x3dbl_1.conv", f"{n}.branch3x3dbl_2.conv") for n, _ in _blocks(model, C.InceptionE)}
    stem = _pairs("", ["Conv2d_1a_3x3.conv", "Conv2d_2a_3x3.conv", "Conv2d_2b_3x3.conv", "Conv2d_3b_1x1.conv",
                       "Conv2d_4a_3x3.conv"])
    return seqs | dbl | stem, {}


def _suffix_pairs(model, cls, a, b):
    return {(f"{n}.{a}", f"{n}.{b}") for n, _ in _blocks(model, cls)}


def _maxvit(model):
    today, pending = _mobile([_unit(n, m, "layers") for n, m in _blocks(model, A.MaxVitMBConv)])
    today |= _suffix_pairs(model, A.PartitionAttentionLayer, "mlp_layer.1", "mlp_layer.3")
    return today | {("stem.0.0", "stem.1.0"), ("classifier.3", "classifier.5")}, pending


def _vgg_like(model, head):
    convs = [n for n, m in model.features.named_children() if isinstance(m, nn.Conv2d)]
    return _pairs("features.", convs) | _pairs("classifier.", head), {}


EXPECTED = {
    "resnet18": _resnet, "resnet50": _resnet, "resnext50_32x4d": _resnet, "wide_resnet50_2": _resnet,
    "regnet_x_400mf": _regnet, "regnet_y_400mf": _regnet,
    "mobilenet_v2": lambda m: _features(m, (N.InvertedResidualV2,), "conv"),
    "mobilenet_v3_small": lambda m: _features(m, (N.InvertedResidualV3,), extra={("classifier.0", "classifier.3")}),
    "mobilenet_v3_large": lambda m: _features(m, (N.InvertedResidualV3,), extra={("classifier.0", "classifier.3")}),
    "efficientnet_b0": lambda m: _features(m, (N.MBConv, N.FusedMBConv)),
    "efficientnet_v2_s": lambda m: _features(m, (N.MBConv, N.FusedMBConv)),
    "mnasnet1_0": _mnasnet,
    "shufflenet_v2_x1_0": lambda m: (_suffix_pairs(m, N.ShuffleUnit, "branch2.0", "branch2.5"), {}),
    "densenet121": lambda m: (_suffix_pairs(m, C._DenseLayer, "conv1", "conv2"), {}),
    "googlenet": lambda m: (_sequential_convs(m, nn.Sequential) | _pairs("", ["conv1.conv", "conv2.conv",
                                                                               "conv3.conv"]), {}),
    "inception_v3": _inception,
    "squeezenet1_0": lambda m: ({("features.0", "features.3.squeeze")}, {}),
    "convnext_tiny": lambda m: (_suffix_pairs(m, A.CNBlock, "block.3", "block.5"), {}),
    "swin_t": lambda m: (_suffix_pairs(m, A.SwinTransformerBlock, "mlp.0", "mlp.3"), {}),
    "vit_b_16": lambda m: (_suffix_pairs(m, A.EncoderBlock, "mlp.0", "mlp.3"), {}),
    "maxvit_t": _maxvit,
    "vgg11_bn": lambda m: _vgg_like(m, ["0", "3", "6"]),
    "alexnet": lambda m: _vgg_like(m, ["1", "4", "6"]),
}


def pending_kinds(name):
    """The kinds of group the reduced model of `name` has pending (its blocks decide; no tracing)."""
    model, _ = build(name)
    return sorted(kind for kind, pairs in EXPECTED[name](model)[1].items() if pairs)


@functools.lru_cache(maxsize=None)
def discovered(name, small=True):
    """(model, example input, report, expected today, pending {reason: pairs}) of the family model."""
    model, x = build(name, small, batch=1)
    report = lk.explain_groups(model, x)
    today, pending = EXPECTED[name](model)
    return model, x, report, today, {k: v for k, v in pending.items() if v}


def test_every_family_has_expectations_and_a_reduced_size():
    assert set(EXPECTED) == set(FAMILIES) == set(SMALL)


def _check_groups_and_reasons(name, small):
    model, x, report, today, pending = discovered(name, small)
    found = {(g.producer, g.consumer) for g in report.groups}
    assert today <= found, f"expected groups not found: {sorted(today - found)}"
    allowed = today.union(*pending.values())
    assert found <= allowed, f"groups the structure does not imply: {sorted(found - allowed)}"
    producers = {g.producer for g in report.groups}
    assert set(report.reasons) | producers == layer_names(model) and not set(report.reasons) & producers
    assert all(isinstance(r, str) and r for r in report.reasons.values())
    assert 0.0 <= grouped_share(model, report.groups) <= 1.0


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_groups_found_and_every_other_layer_has_a_reason(name):
    _check_groups_and_reasons(name, small=True)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LOFT_FULL_FAMILIES"), reason="the real-size models (224x224, minutes in all): "
                    "set LOFT_FULL_FAMILIES=1")
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_real_size_groups_found_and_every_other_layer_has_a_reason(name):
    try:
        _check_groups_and_reasons(name, small=False)
    finally:
        discovered.cache_clear()  # a real-size model is large: keep none alive


PENDING = [pytest.param(name, kind, id=f"{name}-{kind.split()[0]}")
           for name in sorted(FAMILIES) for kind in pending_kinds(name)]


@pytest.mark.parametrize("name,kind", PENDING)
def test_pending_groups(name, kind):
    """The groups that cross SE gates and grouped convs are found."""
    _, _, report, _, pending = discovered(name)
    found = {(g.producer, g.consumer) for g in report.groups}
    assert pending[kind] <= found, f"not found: {sorted(pending[kind] - found)}"


# torchvision's documented parameter counts for 1000 classes (Inception-v3's includes the auxiliary head, which
# these models leave out: its 1x1 conv 768->128 + BN, 5x5 conv 128->768 + BN and Linear 768->1000).
_INCEPTION_AUX = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512, "resnet50": 25_557_032, "resnext50_32x4d": 25_028_904, "wide_resnet50_2": 68_883_240,
    "regnet_x_400mf": 5_495_976, "regnet_y_400mf": 4_344_144, "mobilenet_v2": 3_504_872,
    "mobilenet_v3_small": 2_542_856, "mobilenet_v3_large": 5_483_032, "efficientnet_b0": 5_288_548,
    "efficientnet_v2_s": 21_458_488, "mnasnet1_0": 4_383_312, "shufflenet_v2_x1_0": 2_278_604,
    "densenet121": 7_978_856, "googlenet": 6_624_904, "inception_v3": 27_161_264 - _INCEPTION_AUX,
    "squeezenet1_0": 1_248_424, "convnext_tiny": 28_589_128, "swin_t": 28_288_354, "vit_b_16": 86_567_656,
    "maxvit_t": 30_919_624, "vgg11_bn": 132_868_840, "alexnet": 61_100_840,
}


def test_real_sizes_have_torchvisions_parameter_counts():
    assert set(TORCHVISION_PARAMS) == set(FAMILIES)
    for name, constructor in FAMILIES.items():
        with torch.device("meta"):  # shapes only: no memory, no init
            model = constructor(num_classes=1000)
        assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name], name


def test_mnasnet_state_dict_carries_its_version():
    model = N.mnasnet1_0(alpha=0.5)
    state = model.state_dict()
    assert state._metadata[""]["version"] == 2
    N.mnasnet1_0(alpha=0.5).load_state_dict(state)  # the round trip keeps the metadata
    with pytest.raises(ValueError, match="version should be set to 1 or 2 instead of None"):
        N.mnasnet1_0(alpha=0.5).load_state_dict(dict(state))  # a plain dict has no version
    old = N.mnasnet1_0(alpha=0.5)
    for i, layer in enumerate(N._mnas_stem(32, 16) + [N._mnas_stack(16, N._mnas_depths(0.5)[2],
                                                                    *N.MNASNET_STACKS[0])]):
        old.layers[i] = layer  # what a version-1 model of alpha 0.5 looked like
    v1 = old.state_dict()
    v1._metadata[""]["version"] = 1
    fresh = N.mnasnet1_0(alpha=0.5)
    with pytest.warns(UserWarning, match="version-1"):
        fresh.load_state_dict(v1)
    assert fresh._version == 1 and fresh.layers[0].out_channels == 32
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), old.eval()(x))


# ------------------------------------------------------------------- training ----
def _batches(side):
    return functools.partial(batch, n=4, shape=(3, side, side), classes=10)


def _seed_by_batch(module, args):
    """Every forward draws its dropout / stochastic-depth masks from a seed taken from its batch, so a run that
    builds its workers differently (the sliced reference) draws the same masks for the same batch."""
    torch.manual_seed(int(args[0].double().abs().sum().item() * 1000) % (2 ** 31))


@functools.lru_cache(maxsize=None)
def trained(name):
    """The converted reduced model, its groups, and the reference / simulator states after one LoFT-2 step."""
    model, x = build(name)
    model, groups = lk.convert(_randomise(model).train(), x)
    model.register_forward_pre_hook(_seed_by_batch)
    side = SMALL[name][1]
    sgd = OPTIMIZERS["sgd"]
    ref = run_reference(model, groups, sgd, 2, 1, 0, "reset", 1, batches=_batches(side))[-1]
    snaps, sim = run_simulator(model, groups, sgd, 2, 1, 0, "reset", 1, batches=_batches(side))
    return model, groups, ref, snaps[-1], sim.model


def _trained_or_skip(name):
    if not discovered(name)[2].groups:
        pytest.skip(f"{name}: discovery finds no filter group today")
    return trained(name)


FAMILY_PARAMS = sorted(FAMILIES)


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_loft2_step_equals_sliced_reference_and_one_worker_is_plain_training(name):
    model, groups, ref, sim_state, _ = _trained_or_skip(name)
    diff, where = max_diff(ref, sim_state)
    assert diff <= 1e-4, f"LoFT-2 step: {where} differs from the reference by {diff}"
    init = model.state_dict()
    for g in groups:  # the step trained every group's filters (not only the BatchNorm step counters)
        key = f"{g.producer}.weight"
        assert (sim_state[key] - init[key]).abs().amax() > 1e-6, f"{key} did not move"
    batches = _batches(SMALL[name][1])
    one = run_simulator(model, groups, OPTIMIZERS["sgd"], 1, 2, 0, "keep", 2, batches=batches)[0][-1]
    diff, where = max_diff(one, run_plain(model, groups, OPTIMIZERS["sgd"], 2, batches=batches))
    assert diff <= 1e-5, f"S=1: {where} differs from plain training by {diff}"


PRUNE_PARAMS = FAMILY_PARAMS


@pytest.mark.parametrize("name", PRUNE_PARAMS)
def test_half_ticket_after_a_loft2_step_is_finite_and_equals_masked_model(name):
    _, groups, _, _, stepped = _trained_or_skip(name)
    stepped = copy.deepcopy(stepped).eval()
    pruned, kept = lk.prune(stepped, groups, 0.5)
    assert all(len(kept[g.name]) == g.n - g.n // 2 for g in groups)
    x = build(name, batch=3)[1]
    with torch.no_grad():
        out = pruned.eval()(x)
        assert out.shape == (3, 10) and bool(torch.isfinite(out).all())
        want = masked_model(stepped, groups, {k: v.tolist() for k, v in kept.items()})(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
