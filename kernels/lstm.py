"""LSTM cell: the elementwise step after an LSTM layer's two linears (the seed LSTM text generator), in one launch.

    gates (N, 4H) = x W_ih^T + h W_hh^T + b, torch's order (input i, forget f, cell g, output o); c (N, H)
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g)          h' = sigmoid(o) * tanh(c')

fp32 throughout; tanh and sigmoid from e = exp(-|a|) (or exp(-2|a|)) in (0, 1], which never overflows (tl has no
tanh of its own); NaN stays NaN. One program
per (row, block of BLOCK columns); each element of c is read before the same program writes c', so c_out may be
c (the decode step updates its state in place). Rows may be strided (a time step of the prefill's (T, B, 4H)
gates). Test: tests/test_lstm.py (test_triton_lstm_cell*).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import INTERPRETER, check_out, check_tensor, device_fn, overlaps, pdl_begin, pdl_options

BLOCK = 256  # columns per program: a decode step's H (256-1024) in 1-4 programs per row


@device_fn
def _tanh(a):
    e = tl.exp(-2.0 * tl.abs(a))  # in (0, 1]: no overflow
    t = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0, -t, t)


@device_fn
def _sigmoid(a):
    e = tl.exp(-tl.abs(a))
    return tl.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _lstm_cell_kernel(g_ptr, c_ptr, h_ptr, co_ptr, H, g_stride, c_stride, h_stride, co_stride,
                      BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < H
    g = g_ptr + row * g_stride + cols
    i = tl.load(g, mask=m, other=0.0)
    f = tl.load(g + H, mask=m, other=0.0)
    gg = tl.load(g + 2 * H, mask=m, other=0.0)
    o = tl.load(g + 3 * H, mask=m, other=0.0)
    c = tl.load(c_ptr + row * c_stride + cols, mask=m, other=0.0)
    c_new = _sigmoid(f) * c + _sigmoid(i) * _tanh(gg)
    tl.store(co_ptr + row * co_stride + cols, c_new, mask=m)
    tl.store(h_ptr + row * h_stride + cols, _sigmoid(o) * _tanh(c_new), mask=m)


def lstm_cell(gates: torch.Tensor, c: torch.Tensor, *, h_out: torch.Tensor | None = None,
              c_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gates (N, 4H) fp32, c (N, H) fp32, rows at any stride (columns contiguous) -> (h', c'), written into h_out
    and c_out when given ((N, H) fp32; c_out may be c, h_out must be apart from the inputs)."""
    check_tensor("c", c, 2, (torch.float32,), None, last_contiguous=True)
    dev, (N, H) = c.device, c.shape
    check_tensor("gates", gates, 2, (torch.float32,), dev, last_contiguous=True)
    if tuple(gates.shape) != (N, 4 * H):
        raise ValueError(f"gates has shape {tuple(gates.shape)}, expected ({N}, {4 * H})")
    h = check_out(h_out, (N, H), torch.float32, dev, strided=True, name="h_out")
    c2 = check_out(c_out, (N, H), torch.float32, dev, strided=True, name="c_out")
    if any(overlaps(h, t) for t in (gates, c, c2)):
        raise ValueError("lstm_cell: h_out must not overlap gates, c or c_out")
    if overlaps(c2, gates) or (overlaps(c2, c) and (c2.data_ptr(), c2.stride()) != (c.data_ptr(), c.stride())):
        raise ValueError("lstm_cell: c_out must be c itself or apart from it and from gates")
    if N and H:
        _lstm_cell_kernel[(N, triton.cdiv(H, BLOCK))](
            gates, c, h, c2, H, gates.stride(0), c.stride(0), h.stride(0), c2.stride(0), BLOCK=BLOCK,
            num_warps=1 if INTERPRETER else 2, **pdl_options(dev))
    return h, c2


def reference(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch fp32: (h', c')."""
    i, f, g, o = gates.float().chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new
