"""What the Triton kernel modules share: interpreter mode, dtypes, pointer tables, launch sizes."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Triton picks compiled or interpreted kernels when @triton.jit runs, i.e. when
# these modules are imported; read the same switch here so the two agree.
INTERPRET = bool(triton.knobs.runtime.interpret)

# The interpreter computes bf16 wrongly (a bf16 tl.dot returns garbage) and its fp16
# path is unchecked, so the arithmetic kernels accept only fp32/fp64 there (both
# tested against float64 references); on a GPU they take all four.
FLOAT_DTYPES = ((torch.float32, torch.float64) if INTERPRET
                else (torch.float16, torch.bfloat16, torch.float32, torch.float64))
ANY_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype):
    """Accumulation type inside kernels: fp64 for fp64 inputs, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_table_device(device: torch.device, op: str) -> None:
    """Pointer-table kernels hold raw addresses; the interpreter can only follow host ones."""
    if INTERPRET and device.type != "cpu":
        raise RuntimeError(f"triton {op}: under TRITON_INTERPRET=1 the pointer-table kernels run on CPU tensors "
                           f"only, got {device.type} tensors; unset TRITON_INTERPRET to run the compiled kernels")


def int_table(rows: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Several int64 tables (lists of any lengths) in one host->device copy; one view per table."""
    flat = [v for row in rows for v in row]
    buf = torch.tensor(flat, dtype=torch.int64).to(device)
    out, pos = [], 0
    for row in rows:
        out.append(buf[pos:pos + len(row)])
        pos += len(row)
    return out


def block_programs(counts: list[int], block: int) -> tuple[list[int], list[int]]:
    """Split segment i of counts[i] items into blocks: (segment id, first item) per program."""
    seg, start = [], []
    for i, n in enumerate(counts):
        for s in range(0, n, block):
            seg.append(i)
            start.append(s)
    return seg, start


def launch_opts(**gpu_opts) -> dict:
    """Launch options (num_warps, ...) for compiled kernels; the interpreter takes none."""
    return {} if INTERPRET else gpu_opts


def pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))
