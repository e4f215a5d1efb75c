"""The backend table, in one place. A model is written once against a backend's small op set
(prepare_linear, linear (optionally adding into a residual), layernorm, layernorm_linear, mlp, embedding,
attention_prefill, write_kv, append_attention_decode, append_attention_decode_proj, attention_block_decode,
attention_decode, lstm_cell, run_decode, run_decode_sample, sample, prepare_conv_transpose, conv_transpose,
prepare_conv2d, conv2d, reparameterize, bernoulli_log_likelihood, bernoulli_elbo)."""
from __future__ import annotations

import importlib
import importlib.util

import torch

# name -> (module, class, what it needs)
BACKENDS = {
    "torch": ("aigc_rt.backends.torch_backend", "TorchBackend", "any device"),
    "cpu": ("aigc_rt.backends.cpu", "CpuBackend", "a CPU and the aigc_rt._C extension"),
    "triton": ("aigc_rt.backends.triton_backend", "TritonBackend",
               "a CUDA GPU and the triton package (on a CPU: TRITON_INTERPRET=1, for tests)"),
    "cuda": ("aigc_rt.backends.cuda_backend", "CudaBackend",
             "a CUDA GPU, the triton package and aigc_rt's CUDA kernels (built by setup.py where nvcc is found)"),
}


def resolve(name: str, device: torch.device) -> str:
    """'auto' -> the fastest backend available for the device."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose one of {['auto', *BACKENDS]}")
        return name
    if device.type == "cpu":
        return "cpu"
    return "triton" if device.type == "cuda" and importlib.util.find_spec("triton") else "torch"


def check_device(device) -> torch.device:
    """torch.device(device), or ValueError naming it: not a device string, or a device this machine or this
    torch build does not have (e.g. "cuda" with a CPU-only torch, or "cuda:3" on a one-GPU machine)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e})") from None
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:  # a CPU-only torch asserts for "cuda"
        raise ValueError(f"device {str(dev)!r} is not available here: {e}") from None
    return dev


def get_backend(name: str, device: str | torch.device = "cpu"):
    device = check_device(device)
    name = resolve(name, device)
    module, cls, needs = BACKENDS[name]
    try:
        backend_cls = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise ValueError(f"backend {name!r} is unavailable here (it needs {needs}): {e}") from None
    return backend_cls(device)
