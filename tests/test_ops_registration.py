"""The ops as torch.library custom ops: opcheck, torch.compile, backend selection."""
import warnings

import pytest
import torch

import loft_kernels as lk
from loft_kernels import backends

ops = torch.ops.loft_kernels


def _opcheck_cases(device):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    idx = lambda *v: torch.tensor(v, device=device)  # noqa: E731
    x, w, b = r(2, 3, 6, 6), r(5, 4, 3, 3), r(5)
    xg = r(2, 2, 3, 5, 5)
    return [
        (ops.partial_conv2d.default, (x, w, b, idx(4, 1), idx(0, 2, 3), [1, 1], [1, 1], [1, 1], 1)),
        (ops.partial_conv2d_backward.default,
         (r(2, 2, 6, 6), x, w, idx(4, 1), idx(0, 2, 3), True, [1, 1], [1, 1], [1, 1], 1, True, True)),
        (ops.grouped_partial_conv2d.default,
         (xg, w, b, idx(0, 1, 2, 3).view(2, 2), idx(0, 1, 2, 1, 2, 3).view(2, 3), [2, 2], [1, 1], [1, 1])),
        (ops.grouped_partial_conv2d_backward.default,
         (r(2, 2, 2, 3, 3), xg, w, idx(0, 1, 2, 3).view(2, 2), idx(0, 1, 2, 1, 2, 3).view(2, 3), True,
          [2, 2], [1, 1], [1, 1], True, True)),
        (ops.filter_norms.default, ([r(4, 3, 3, 3), r(7)],)),
        (ops.filter_stats.default, ([r(4, 3, 3, 3), r(7)], [r(4, 3, 3, 3), r(7)])),
        (ops.footrule_matrix.default, ([r(3, 5), r(3, 2)],)),
        (ops.mask_distance_matrix.default, ([r(3, 5), r(3, 2)], [3, 1])),
        (ops.pack_rows.default, ([r(4, 3), r(6)], [idx(1, 3), idx(5)], [0, 0])),
        (ops.unpack_rows.default, (r(7), [r(4, 3), r(6)], [idx(1, 3), idx(5)], [0, 0])),
    ]


@pytest.mark.parametrize("case", range(10))
def test_opcheck(backend, device, case):
    op, args = _opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


def _other_layouts(case):
    """The conv cases (0-3) with a channels-last x, weight and gradient (a permuted 5-D x for the grouped op)."""
    def relayout(t):
        if t.dim() == 4:
            return t.to(memory_format=torch.channels_last)
        if t.dim() == 5:
            return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        return t
    op, args = _opcheck_cases("cpu")[case]
    return op, tuple(relayout(a) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("case", range(4))
def test_opcheck_with_channels_last_tensors(backend, device, case):
    op, args = _other_layouts(case)
    assert not args[0].is_contiguous() and not args[1].is_contiguous()
    torch.library.opcheck(op, tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
def test_inductor_compiles_a_channels_last_partial_conv():
    """Inductor lays out an op's result from its fake kernel; the real op must return exactly those strides."""
    x = torch.randn(2, 3, 7, 7).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(5, 3, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    rows = torch.tensor([4, 0])

    def step(x, w):
        return lk.partial_conv2d(x, w, None, 1, 1, out_index=rows).sin().sum()

    compiled = torch.compile(step, backend="inductor")
    got = torch.autograd.grad(compiled(x, w), (x, w))
    torch._dynamo.reset()
    want = torch.autograd.grad(step(x, w), (x, w))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def test_partial_conv2d_requires_grad_through_opcheck(backend, device):
    x = torch.randn(2, 3, 6, 6, device=device, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, device=device, requires_grad=True)
    torch.library.opcheck(ops.partial_conv2d.default,
                          (x, w, None, torch.tensor([4, 1], device=device), torch.tensor([0, 2, 3], device=device),
                           [1, 1], [1, 1], [1, 1], 1))


def test_torch_compile_fullgraph():
    """The ops trace into one graph (no graph breaks) and give the eager result."""
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    oi, ii = torch.tensor([5, 0, 2]), torch.tensor([1, 3])

    def step(x, w):
        y = lk.partial_conv2d(x[:, :2], w, None, 1, 1, out_index=oi, in_index=ii).relu()
        norms = lk.filter_norms([w])[0]
        return y.square().mean() + norms.sum() * 0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, w)
    (gw,) = torch.autograd.grad(loss, [w])
    loss_ref = step(x, w)
    (gw_ref,) = torch.autograd.grad(loss_ref, [w])
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(gw, gw_ref)


def test_available_backends_lists_torch_first():
    names = lk.available_backends()
    assert names[0] == "torch"
    assert set(names) <= set(backends.BACKENDS)


def test_use_backend_rejects_unknown_and_unavailable():
    with pytest.raises(ValueError, match="name must be one of"):
        with lk.use_backend("fortran"):
            pass
    missing = [b for b in backends.BACKENDS if backends.unavailable_reason(b) is not None]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(RuntimeError, match=f"backend '{missing[0]}' was requested but is unavailable"):
        with lk.use_backend(missing[0]):
            pass


def test_use_backend_selects_and_restores():
    x = torch.randn(3, 4)
    with lk.use_backend("torch"):
        assert backends.select("filter_norms", x.device, x.dtype)[0] == "torch"
        with lk.use_backend("auto"):
            assert backends.requested_backend() is None
        assert backends.requested_backend() == "torch"
    assert backends.requested_backend() is None


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.select("filter_norms", torch.device("cpu"), torch.float32)[0] == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        backends.select("filter_norms", torch.device("cpu"), torch.float32)


def test_automatic_fallback_warns_once(monkeypatch):
    monkeypatch.setitem(backends._reasons, "cpu", "pretend the extension failed to build")
    monkeypatch.setattr(backends, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lk.filter_norms([torch.randn(3, 3)])
        lk.filter_norms([torch.randn(3, 3)])
    msgs = [str(w.message) for w in caught if "pretend the extension" in str(w.message)]
    assert len(msgs) == 1 and "falling back" in msgs[0]


def test_explicit_backend_without_dtype_support_is_clear(monkeypatch):
    monkeypatch.setitem(backends._impls, ("filter_norms", "torch"),
                        backends.Impl(backends._impls[("filter_norms", "torch")].fn, frozenset({torch.float64})))
    with lk.use_backend("torch"):
        with pytest.raises(TypeError, match="backend 'torch' runs filter_norms for dtypes"):
            lk.filter_norms([torch.randn(3, 3)])


def _sliced(x, w, b, out_index):
    return torch.nn.functional.conv2d(x, w.index_select(0, out_index), b.index_select(0, out_index), padding=1)


def test_jit_trace_records_the_convolution_it_runs():
    """torch.jit.trace cannot see into a compiled kernel: the op traces as index_select + conv2d."""
    torch.manual_seed(0)
    layer = lk.LoftConv2d(4, 6, 3, padding=1)
    layer.set_active(out_index=torch.tensor([0, 2, 5]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer warns about the Python checks it cannot record
        traced = torch.jit.trace(layer, (torch.randn(2, 4, 5, 5),))
    x = torch.randn(3, 4, 7, 7)  # other values and sizes than at trace time
    torch.testing.assert_close(traced(x), _sliced(x, layer.weight, layer.bias, torch.tensor([0, 2, 5])))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's own use
def test_functorch_transforms_differentiate_the_op():
    """jvp, grad and vmap see plain PyTorch ops (the custom op has no forward-mode or higher-order rule)."""
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    w, b, rows = torch.randn(6, 4, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64), torch.tensor([4, 1])
    op = lambda z, w: lk.partial_conv2d(z, w, b, padding=1, out_index=rows)  # noqa: E731
    ref = lambda z, w: _sliced(z, w, b, rows)  # noqa: E731
    torch.testing.assert_close(torch.func.jvp(lambda z: op(z, w), (x,), (t,)),
                               torch.func.jvp(lambda z: ref(z, w), (x,), (t,)))
    grad = torch.func.grad(lambda w: op(x, w).square().sum())(w)
    torch.testing.assert_close(grad, torch.func.grad(lambda w: ref(x, w).square().sum())(w))
    assert grad[[0, 2, 3, 5]].abs().max() == 0  # rows outside the set get no gradient
    xs = torch.randn(3, 2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(lambda z: op(z, w))(xs), torch.stack([ref(z, w) for z in xs]))


@pytest.mark.parametrize("call", ["compiled", "direct"])
def test_duplicate_or_out_of_range_indices_are_refused_inside_the_op(call):
    """The public functions' value checks do not run in a compiled graph nor for a direct torch.ops call: the CPU
    kernels check, instead of returning a wrong weight gradient (two copies of one row, one of them lost)."""
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3, requires_grad=True)
    if call == "compiled":
        run = torch.compile(lambda i: lk.partial_conv2d(x, w, out_index=i), backend="aot_eager", fullgraph=True)
    else:
        run = lambda i: ops.partial_conv2d(x, w, None, i, None, [1, 1], [0, 0], [1, 1], 1)  # noqa: E731
    with pytest.raises(ValueError, match="out_index has duplicate entries"):
        run(torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="out_index has entry 7, out of range"):
        run(torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="indices\\[0\\] has duplicate entries"):
        torch.compile(lambda t, i: lk.unpack_rows(torch.arange(6.0), [t], [i]), backend="eager")(
            torch.zeros(4, 3), torch.tensor([1, 1]))
    assert torch.is_grad_enabled()  # the refusal inside a compiled graph leaves grad mode as it was


def test_grouped_op_takes_an_empty_batch_like_the_single_op():
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    y = lk.grouped_partial_conv2d(torch.randn(2, 0, 4, 5, 5), w, out_index=torch.tensor([[0], [1]]))
    assert y.shape == (2, 0, 1, 3, 3)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_jit_script_says_the_loft_layers_are_not_scriptable():
    for layer in (lk.LoftConv2d(3, 4, 3), lk.LoftLinear(3, 4), lk.LoftBatchNorm2d(4)):
        with pytest.raises(RuntimeError, match=f"{type(layer).__name__} cannot be compiled by torch.jit.script"):
            torch.jit.script(torch.nn.Sequential(layer))


def test_the_custom_ops_check_the_bias_and_take_any_valid_index_layout():
    """What the public functions check and normalise, the ops do too (a direct torch.ops call, a compiled graph):
    a short bias was read past its end; a strided or int32 index was refused with a 2-D shape in the message."""
    x, w = torch.randn(2, 3, 7, 7), torch.randn(6, 5, 3, 3)
    with pytest.raises(ValueError, match="bias must have 6 entries"):
        ops.partial_conv2d(torch.randn(1, 5, 4, 4), torch.zeros(6, 5, 3, 3), torch.arange(100.0)[:2],
                           torch.tensor([5, 3]), None, [1, 1], [0, 0], [1, 1], 1)
    rows, cols = torch.tensor([4, 9, 0, 9, 2])[::2], torch.tensor([3, 1, 0], dtype=torch.int32)
    expected = torch.nn.functional.conv2d(x, w[[4, 0, 2]][:, [3, 1, 0]], padding=1)
    torch.testing.assert_close(ops.partial_conv2d(x, w, None, rows, cols, [1, 1], [1, 1], [1, 1], 1), expected)
    compiled = torch.compile(lambda x, w, r, c: lk.partial_conv2d(x, w, None, padding=1, out_index=r, in_index=c),
                             backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, rows, cols), expected)


def test_direct_op_calls_get_the_public_functions_checks():
    """The CUDA bindings lack some of the CPU build's checks; the ops check in Python what the kernels assume, on
    every device (here seen through a direct call on CPU tensors)."""
    t = torch.zeros(4, 3)
    with pytest.raises(TypeError, match="tensors\\[0\\] has dtype torch.float32 but flat has torch.float64"):
        ops.unpack_rows(torch.zeros(3, dtype=torch.float64), [t], [torch.tensor([1])], [0])
    with pytest.raises(ValueError, match="flat must be 1-D with 3 elements"):
        ops.unpack_rows(torch.zeros(5), [t], [torch.tensor([1])], [0])
    with pytest.raises(ValueError, match="a\\[0\\] and b\\[0\\] must have the same shape"):
        ops.filter_stats([torch.zeros(4, 3)], [torch.zeros(4, 2)])
    with pytest.raises(ValueError, match="same number of snapshots"):
        ops.footrule_matrix([torch.rand(3, 5), torch.rand(2, 5)])
    with pytest.raises(ValueError, match="keep must hold one count in 0..n"):
        ops.mask_distance_matrix([torch.rand(3, 5)], [9])
