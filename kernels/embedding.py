"""Token (+ position) embedding: one launch for what a decode step's first op needs.

    y[n] = table[ids[n]] * scale[ids[n]] + pos_table[positions[n]]      (N rows of C, fp32)

table (V, C) fp32 | bf16 | fp16 | int8 (int8 with per-row scales (V,); the others without), pos_table (P, C)
fp32 or none. An id outside [0, V) or a position outside [0, P) gives a row of NaN rather than a read out of
bounds: the logits then hold NaN and generation stops with an error that says so (the ids generation passes
are checked on the host before they get here, so this only catches misuse).
One program per row, the whole row in registers. Test: tests/test_triton_kernels.py (test_embedding*).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import FLOAT_DTYPES, check_out, check_scale, check_tensor, pdl_begin, pdl_options, row_settings


@triton.jit
def _embedding_kernel(table_ptr, scale_ptr, ids_ptr, pos_table_ptr, pos_ptr, y_ptr, V, P, C,
                      SCALED: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    in_row = cols < C
    token = tl.load(ids_ptr + row).to(tl.int64)
    ok = (token >= 0) & (token < V)
    token = tl.where(ok, token, 0)
    y = tl.load(table_ptr + token * C + cols, mask=in_row, other=0.0).to(tl.float32)
    if SCALED:
        y *= tl.load(scale_ptr + token)
    if HAS_POS:
        pos = tl.load(pos_ptr + row).to(tl.int64)
        ok &= (pos >= 0) & (pos < P)
        pos = tl.where(ok, pos, 0)
        y += tl.load(pos_table_ptr + pos * C + cols, mask=in_row, other=0.0)
    tl.store(y_ptr + row * C + cols, tl.where(ok, y, float("nan")), mask=in_row)


def embedding(table: torch.Tensor, ids: torch.Tensor, *, scale: torch.Tensor | None = None,
              pos_table: torch.Tensor | None = None, positions: torch.Tensor | None = None,
              out=None) -> torch.Tensor:
    """table (V, C), ids (...) int on the device -> (..., C) fp32 rows table[ids] (dequantised with scale for
    int8 tables), plus pos_table[positions] when given (positions: ids' shape)."""
    check_tensor("table", table, 2, (*FLOAT_DTYPES, torch.int8), None)
    dev = table.device
    V, C = table.shape
    if not table.is_contiguous():
        raise ValueError(f"table must be contiguous, got strides {table.stride()}")
    check_scale("table", table, scale, dev)
    check_tensor("ids", ids, None, (torch.int64, torch.int32), dev)
    if (pos_table is None) != (positions is None):
        raise ValueError("embedding: pos_table and positions go together (one was given without the other)")
    if pos_table is not None:
        check_tensor("pos_table", pos_table, 2, (torch.float32,), dev)
        check_tensor("positions", positions, None, (torch.int64, torch.int32), dev)
        if pos_table.shape[1] != C or not pos_table.is_contiguous():
            raise ValueError(f"pos_table must be a contiguous (P, {C}) tensor, got {tuple(pos_table.shape)}")
        if positions.shape != ids.shape:
            raise ValueError(f"positions has shape {tuple(positions.shape)}, ids {tuple(ids.shape)}; they must match")
    y = check_out(out, (*ids.shape, C), torch.float32, dev)
    if ids.numel() == 0:
        return y
    block, num_warps = row_settings(C)
    _embedding_kernel[(ids.numel(),)](
        table, table if scale is None else scale, ids.contiguous(), table if pos_table is None else pos_table,
        ids if positions is None else positions.contiguous(), y, V, 0 if pos_table is None else pos_table.shape[0],
        C, SCALED=scale is not None, HAS_POS=pos_table is not None, BLOCK_C=block, num_warps=num_warps,
        **pdl_options(dev))
    return y


def reference(table, ids, scale=None, pos_table=None, positions=None):
    """Plain PyTorch fp32 (the torch backend's embedding)."""
    rows = table[ids].float()
    if scale is not None:
        rows = rows * scale[ids].unsqueeze(-1)
    return rows if pos_table is None else rows + pos_table[positions]
