"""The automatic backend choice on CUDA devices (faked: no GPU needed) and the op table."""
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loft_kernels as lk
from loft_kernels import backends
from loft_kernels.backends import choice, table

README = Path(__file__).resolve().parents[1] / "README.md"
CUDA = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A CUDA device named "Fake GPU 9000" whose kernel backends count as available."""
    monkeypatch.setattr(choice, "device_name", lambda index: "Fake GPU 9000")
    monkeypatch.setenv(choice.RESULTS_ENV, str(tmp_path))
    for name in ("cuda", "triton"):
        module = importlib.import_module(f"loft_kernels.backends.{backends._MODULES[name]}")
        monkeypatch.setitem(backends._reasons, name, None)
        for op in table.ops_of(name):  # what registration would add on a GPU machine
            fn = module.implementation(op.name) if hasattr(module, "implementation") else None
            monkeypatch.setitem(backends._impls, (op.name, name), backends.Impl(fn, None))
    (tmp_path / "gpu-check-fake-gpu-9000").mkdir()
    return tmp_path / "gpu-check-fake-gpu-9000" / "summary.json"


def test_device_class_is_a_file_name_key():
    assert choice.device_class("NVIDIA H200") == "nvidia-h200"
    assert choice.device_class("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"


def test_without_a_stored_result_every_op_runs_on_the_reference(fake_gpu):
    """A kernel that has never run on a GPU class is never its default: not the CUDA kernels, not Triton's."""
    for op in table.OPS:
        assert backends.select(op.name, CUDA, torch.float32)[0] == "torch", op.name
    chosen = backends.backend_choices(CUDA)
    assert set(chosen) == set(table.public_ops())
    for public, (name, why) in chosen.items():
        assert name == "torch"
        assert "no GPU check result for fake-gpu-9000" in why and "never a kernel that has not run" in why


def test_a_stored_result_orders_the_backends_per_op(fake_gpu):
    orders = {p: ["cuda", "torch"] for p in table.public_ops()}
    orders["filter_stats"] = ["triton", "cuda"]
    orders["footrule_matrix"] = []  # no kernel backend passed: the reference
    fake_gpu.write_text(json.dumps({"date": "2026-11-30", "orders": orders, "sources": choice.kernel_sources()}))
    assert backends.select("filter_stats", CUDA, torch.float32)[0] == "triton"
    assert backends.select("partial_conv2d_backward", CUDA, torch.float32)[0] == "cuda"
    assert backends.select("footrule_matrix", CUDA, torch.float32)[0] == "torch"
    chosen = backends.backend_choices(CUDA)
    assert chosen["filter_stats"][0] == "triton" and "fastest correct backend" in chosen["filter_stats"][1]
    assert "found no correct kernel backend" in chosen["footrule_matrix"][1]


def test_a_measured_backend_that_is_missing_falls_back_to_the_next(fake_gpu, monkeypatch):
    fake_gpu.write_text(json.dumps({"orders": {"filter_norms": ["triton", "cuda"]},
                                    "sources": choice.kernel_sources()}))
    monkeypatch.setitem(backends._reasons, "triton", "pretend triton is broken")
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="pretend triton is broken"):
        assert backends.select("filter_norms", CUDA, torch.float32)[0] == "cuda"


def test_an_unreadable_malformed_or_stale_stored_result_counts_as_none(fake_gpu):
    sources = choice.kernel_sources()
    for content in ("{not json", json.dumps({"orders": "nonsense", "sources": sources}),
                    json.dumps({"orders": {"pack_rows": None}, "sources": sources}),
                    json.dumps({"orders": {"pack_rows": ["cuda", "bogus"]}, "sources": sources}),
                    json.dumps({"orders": {"pack_rows": ["cuda"]}}),  # measured on unknown kernel sources
                    json.dumps({"orders": {"pack_rows": ["cuda"]}, "sources": "0" * 16})):  # on other sources
        fake_gpu.write_text(content)
        assert backends.select("pack_rows", CUDA, torch.float32)[0] == "torch", content
    assert "measured other kernel sources" in backends.backend_choices(CUDA)["pack_rows"][1]


def test_choices_on_cpu_say_why():
    chosen = lk.backend_choices("cpu") if hasattr(lk, "backend_choices") else backends.backend_choices("cpu")
    expect = "cpu" if backends.unavailable_reason("cpu") is None else "torch"
    assert all(name == expect and why for name, why in chosen.values())


def test_table_names_one_family_per_layer():
    """Every op family has its module in ops/, in the Triton backend and in csrc/{cpu,cuda,include}."""
    root = Path(backends.__file__).resolve().parents[2]
    for family in {op.family for op in table.OPS}:
        assert (root / "loft_kernels" / "ops" / f"{family}.py").is_file()
        assert (root / "loft_kernels" / "backends" / "triton" / f"{family}.py").is_file()
        assert (root / "csrc" / "cpu" / f"{family}.cpp").is_file()
        assert (root / "csrc" / "cuda" / f"{family}.cu").is_file()
        assert (root / "csrc" / "include" / "loft_kernels" / f"{family}.h").is_file()


def test_registry_holds_exactly_the_table():
    for name in lk.available_backends():
        have = {op for op, b in backends._impls if b == name}
        assert have == {op.name for op in table.ops_of(name)}


def test_readme_matrix_is_what_the_registry_says():
    text = README.read_text()
    found = re.search(r"<!-- op-matrix -->\n(.*?)<!-- /op-matrix -->", text, re.S)
    assert found, "README.md lacks the <!-- op-matrix --> block"
    assert found.group(1) == table.matrix_markdown()


def test_choices_under_the_environment_variable_say_it_was_requested(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert all(choice == ("torch", f"requested by the environment variable {backends.ENV_VAR}")
               for choice in backends.backend_choices("cpu").values())


def test_a_missing_triton_says_which_extra_installs_it():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import loft_kernels.backends.triton as t; print(t.unavailable_reason())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'loft_kernels[triton]'" in out, out
