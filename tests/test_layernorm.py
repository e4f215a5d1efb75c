"""C++ layernorm (csrc/cpu/layernorm.cpp) vs torch, fp32 on odd shapes."""
import pytest
import torch
import torch.nn.functional as F

from aigc_rt import _C

ATOL, RTOL = 1e-5, 1e-5  # fp32


@pytest.mark.parametrize("rows,C", [(1, 1), (3, 17), (17, 111), (5, 500), (2, 1023), (4, 1600)])
def test_layernorm(rows, C):
    g = torch.Generator().manual_seed(rows * C)
    x = torch.randn(rows, C, generator=g) * 3 + 1
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    want = F.layer_norm(x, (C,), w, b, 1e-5)
    got = _C.layernorm(x, w, b, 1e-5)
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"max abs err {(got - want).abs().max():.3g}"


def test_bad_arguments_raise_value_error():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight/bias have 7/8 elements, expected 8"):
        _C.layernorm(x, torch.ones(7), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="must be Float"):
        _C.layernorm(x.double(), torch.ones(8), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        _C.layernorm(torch.randn(8, 2).t(), torch.ones(8), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="out must not overlap its input"):
        _C.layernorm(x, torch.ones(8), torch.zeros(8), 1e-5, out=x)
