"""The op table: every kernel op declared once, with the backends that implement it.

The registry (loft_kernels.backends) registers exactly these (op, backend)
pairs, looking each implementation up by the op's name in its backend
(`reference.py`, the Triton modules, the compiled extension); the self-check,
`loft bench` and the GPU check iterate over the public ops listed here; the
op x backend matrix in README.md is `matrix_markdown()` (a test keeps the two
equal; `python -m loft_kernels.backends.table` prints it).

One name per op family across the layers: ops/<family>.py,
backends/triton/<family>.py, csrc/{cpu,cuda}/<family>.*, csrc/include/loft_kernels/<family>.h.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Dtype classes a backend accepts for an op (resolved to dtype sets by the registry):
FLOAT = "float"          # float16, bfloat16, float32, float64
ANY = "any"              # any dtype: elements are copied as raw words
TRITON_FLOAT = "triton-float"  # FLOAT on a GPU; float32/float64 in Triton's CPU interpreter
TRITON_WORDS = "triton-words"  # floats, bool and the integer types

_KERNELS = {"torch": FLOAT, "cpu": FLOAT, "triton": TRITON_FLOAT, "cuda": FLOAT}


@dataclass(frozen=True)
class OpSpec:
    name: str      # dispatch key = torch custom op name = function name in every backend
    family: str    # the module name of the op family in every layer
    public: str    # the `lk.<public>` function that runs it
    backends: dict = field(default_factory=dict)  # backend -> dtype class
    summary: str = ""


def _conv(name: str, public: str, summary: str = "") -> OpSpec:
    return OpSpec(name, "partial_conv", public, dict(_KERNELS), summary)


OPS: tuple[OpSpec, ...] = (
    _conv("partial_conv2d", "partial_conv2d", "conv over selected filters / channels of one weight"),
    _conv("partial_conv2d_backward", "partial_conv2d"),
    _conv("grouped_partial_conv2d", "grouped_partial_conv2d", "G partial convs over one shared weight"),
    _conv("grouped_partial_conv2d_backward", "grouped_partial_conv2d"),
    OpSpec("filter_norms", "filter_stats", "filter_norms", dict(_KERNELS), "per-row L2 norms of many tensors"),
    OpSpec("filter_stats", "filter_stats", "filter_stats", dict(_KERNELS), "per-row |a|^2, |b|^2, <a,b>, |a-b|^2"),
    OpSpec("footrule_matrix", "ranking", "footrule_matrix", {**_KERNELS, "triton": FLOAT},
           "LoFT footrule distance between snapshots"),
    OpSpec("mask_distance_matrix", "ranking", "mask_distance_matrix", {**_KERNELS, "triton": FLOAT},
           "Early-Bird mask distance between snapshots"),
    OpSpec("pack_rows", "packing", "pack_rows", {"torch": ANY, "cpu": ANY, "triton": TRITON_WORDS, "cuda": ANY},
           "selected rows of many tensors -> one flat buffer"),
    OpSpec("unpack_rows", "packing", "unpack_rows", {"torch": ANY, "cpu": ANY, "triton": TRITON_WORDS, "cuda": ANY},
           "one flat buffer -> selected rows, in place"),
)

BY_NAME = {op.name: op for op in OPS}


def public_ops() -> list[str]:
    """The user-facing ops (`lk.<name>`), in table order; each covers its forward and backward entries."""
    return list(dict.fromkeys(op.public for op in OPS))


def public_of(name: str) -> str:
    """The public op a dispatch key belongs to (a backward belongs to its forward)."""
    return BY_NAME[name].public


def ops_of(backend: str) -> list[OpSpec]:
    return [op for op in OPS if backend in op.backends]


_CLASS_TEXT = {FLOAT: "fp16/bf16/fp32/fp64", ANY: "any dtype", TRITON_WORDS: "floats, ints, bool",
               TRITON_FLOAT: "fp16/bf16/fp32/fp64 (interpreter: fp32/fp64)"}


def matrix_markdown(backends=("torch", "cpu", "triton", "cuda")) -> str:
    """The op x backend matrix: which backend runs which public op, for which dtypes."""
    lines = ["| op | " + " | ".join(f"`{b}`" for b in backends) + " |", "|---" * (len(backends) + 1) + "|"]
    for public in public_ops():
        entries = [op for op in OPS if op.public == public]
        cells = []
        for b in backends:
            classes = {op.backends.get(b) for op in entries}
            cells.append("-" if None in classes else " / ".join(sorted(_CLASS_TEXT[c] for c in classes)))
        lines.append(f"| `{public}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(matrix_markdown(), end="")
