"""The CUDA kernels of csrc/cuda, called through ctypes.

setup.py builds csrc/cuda/*.cu with nvcc into one shared library, aigc_rt/_cuda_kernels*.so, wherever nvcc is
found (CUDA runtime linked statically: the library needs only the driver, not the toolkit, where it runs). Each
kernel file exports a C launch function taking raw pointers and a cudaStream_t, so no torch headers are compiled:
this module checks the tensors, fills the argument struct and launches on torch's current stream (so the
launches join CUDA-graph captures like any other).

The same sources compiled for the CPU with csrc/cuda/emulate.h (tests/test_cuda_kernels.py builds that with g++)
give a library whose kernels run on CPU tensors (each CUDA thread a fiber): CudaKernels(path) loads either, and
`emulated` says which. AIGC_RT_CUDA_LIB names a library to use instead of the installed one.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os

import torch

from .kernels import linear
from .kernels.utils import l2_prefetchable, pdl_options

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}  # csrc/cuda/common.cuh Dtype
ROWS_PER_WARP = (1, 2, 4)  # gemv launch configurations built
MAX_WARPS = 8
ACT_CODES = {None: 0, "gelu_tanh": 1, "relu": 2}  # GemvArgs.act (csrc/cuda/gemv.cu kActNone, ...)
# (rows per warp, warps per block) the GEMV's autotuning times, each also with the L2 prefetch where it may run
GEMV_CANDIDATES = [(1, 4), (2, 4), (4, 4), (2, 8), (4, 8)]


class GemvArgs(ctypes.Structure):
    """csrc/cuda/gemv.cu's GemvArgs, field for field."""
    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "w", "scale", "bias", "ln_w", "ln_b", "y")] + \
               [(name, ctypes.c_int64) for name in ("M", "N", "K", "x_stride", "w_stride", "y_stride", "kc")] + \
               [("eps", ctypes.c_float)] + \
               [(name, ctypes.c_int32) for name in ("dtype", "act", "accumulate", "rows_per_warp", "warps", "pdl",
                                                    "prefetch")]


class CudaKernels:
    """One build of csrc/cuda: the nvcc one (GPU tensors) or the CPU emulation (CPU tensors)."""

    def __init__(self, path: str):
        self.path = path
        lib = ctypes.CDLL(path)
        lib.aigc_gemv.argtypes = [ctypes.POINTER(GemvArgs), ctypes.c_void_p]
        lib.aigc_gemv.restype = ctypes.c_int32
        lib.aigc_gemv_max_rows.restype = ctypes.c_int64
        lib.aigc_cuda_error_string.argtypes = [ctypes.c_int32]
        lib.aigc_cuda_error_string.restype = ctypes.c_char_p
        lib.aigc_cuda_emulated.restype = ctypes.c_int32
        lib.aigc_gemv_args_bytes.restype = ctypes.c_int64
        if lib.aigc_gemv_args_bytes() != ctypes.sizeof(GemvArgs):
            raise ValueError(f"{path}: its GemvArgs has {lib.aigc_gemv_args_bytes()} bytes, aigc_rt's mirror "
                             f"{ctypes.sizeof(GemvArgs)}: the library and the package are from different versions")
        self._lib = lib
        self.emulated = bool(lib.aigc_cuda_emulated())
        self.gemv_max_rows = lib.aigc_gemv_max_rows()  # rows of activations one GEMV launch takes
        self.gemv_configs: dict[tuple, tuple[int, int, bool]] = {}  # autotuned: shape and flags -> config

    def __repr__(self):
        return f"CudaKernels({self.path!r}{', emulated' if self.emulated else ''})"

    def device_ok(self, device: torch.device) -> bool:
        """Whether this build's kernels take tensors on `device` (the emulation: the CPU; else a GPU)."""
        return device.type == ("cpu" if self.emulated else "cuda")

    def gemv_takes(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        """Whether the GEMV takes these operands: at most gemv_max_rows rows of x, weights of a dtype it has."""
        return x.numel() // x.shape[-1] <= self.gemv_max_rows and w.dtype in DTYPES and w.dim() == 2

    def gemv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, act: str | None = None, *,
             scale: torch.Tensor | None = None, norm: tuple | None = None, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, rows_per_warp: int = 0, warps: int = 0,
             prefetch: bool = False, tune: bool = False) -> torch.Tensor:
        """kernels.linear.linear's contract and checks (x (..., K) fp32, w (N, K), b, act, scale, norm, residual,
        out), on csrc/cuda/gemv.cu: each row of x streams all of W, so it is for a decode step's row or few.
        rows_per_warp (1, 2, 4) and warps (1..8) pick the launch configuration (0: the defaults); prefetch: each
        warp first asks L2 for its weight rows (Hopper). tune: those three are chosen by timing the candidates
        (GEMV_CANDIDATES) the first time a shape and set of flags comes, and kept (gemv_configs). Launched with
        programmatic dependent launch where the Triton kernels are (AIGC_RT_PDL=1 on Hopper: pdl_options)."""
        dev = x.device
        if not self.device_ok(dev):
            build, wants = ("CPU emulation", "CPU") if self.emulated else ("GPU", "CUDA")
            raise ValueError(f"x is on {dev}; this build of the CUDA kernels ({build}) takes {wants} tensors")
        x2, y, N, K = linear.operands(x, w, b, act, scale, norm, residual, out)
        if rows_per_warp not in (0, *ROWS_PER_WARP) or not (isinstance(warps, int) and 0 <= warps <= MAX_WARPS):
            raise ValueError(f"rows_per_warp must be 0 or one of {ROWS_PER_WARP} and warps in [0, {MAX_WARPS}], "
                             f"got {rows_per_warp!r}, {warps!r}")
        M = x2.shape[0]
        if M > self.gemv_max_rows:
            raise ValueError(f"the CUDA GEMV takes at most {self.gemv_max_rows} rows of x, got {M}")
        if M == 0:
            return y
        ln_w, ln_b, eps = norm if norm is not None else (None, None, 0.0)
        pdl = not self.emulated and pdl_options(dev)["PDL"]

        def ptr(t):
            return None if t is None else t.data_ptr()

        def run(rows_per_warp, warps, prefetch):
            args = GemvArgs(ptr(x2), ptr(w), ptr(scale), ptr(b), ptr(ln_w), ptr(ln_b), ptr(y), M, N, K,
                            x2.stride(0), w.stride(0), N, 0, float(eps), DTYPES[w.dtype], ACT_CODES[act],
                            residual is not None, rows_per_warp, warps, pdl, bool(prefetch))
            self._launch(self._lib.aigc_gemv, args, dev, "gemv")

        if tune:
            key = (M, N, K, w.dtype, norm is not None, act, b is not None, residual is not None, pdl)
            if key not in self.gemv_configs:
                self.gemv_configs[key] = self._tune(run, w, y if residual is not None else None)
            rows_per_warp, warps, prefetch = self.gemv_configs[key]
        run(rows_per_warp, warps, prefetch)
        return y

    def _tune(self, run, w: torch.Tensor, accumulated: torch.Tensor | None) -> tuple[int, int, bool]:
        """The fastest of GEMV_CANDIDATES, with and without the L2 prefetch where it may run."""
        prefetch = (False, True) if l2_prefetchable(w, w.shape[1] * w.element_size()) else (False,)
        return self.fastest({(r, warps, p): (lambda r=r, warps=warps, p=p: run(r, warps, p))
                             for r, warps in GEMV_CANDIDATES for p in prefetch}, accumulated)

    def fastest(self, candidates: dict, accumulated: torch.Tensor | None):
        """The key of the candidate fn that self.timer finds fastest (the first of equals), each run once first
        (a first run may tune or compile it); an output they add into (the residual stream) is put back as it
        was after all the runs."""
        saved = accumulated.clone() if accumulated is not None else None
        for fn in candidates.values():
            fn()
        times = {key: self.timer(fn) for key, fn in candidates.items()}
        if saved is not None:
            accumulated.copy_(saved)
        return min(times, key=times.get)

    @staticmethod
    def timer(fn) -> float:
        """The autotuning's clock: the median time of fn over ~10 ms, the L2 cache flushed before each run."""
        import triton.testing
        return triton.testing.do_bench(fn, warmup=2, rep=10, return_mode="median")

    def _launch(self, fn, args: ctypes.Structure, dev: torch.device, what: str) -> None:
        """fn(&args, stream) on torch's current stream of dev (with dev the current device, which the library's
        own CUDA runtime takes from the thread); RuntimeError naming the kernel and the error."""
        if self.emulated:
            status = fn(ctypes.byref(args), None)
        elif dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                status = fn(ctypes.byref(args), torch.cuda.current_stream(dev).cuda_stream)
        else:
            status = fn(ctypes.byref(args), torch.cuda.current_stream(dev).cuda_stream)
        if status != 0:
            raise RuntimeError(f"CUDA kernel {what}: {self._lib.aigc_cuda_error_string(status).decode()} "
                               f"(status {status})")


def installed_path() -> str | None:
    """The library setup.py built beside this module (None where nvcc was not found)."""
    found = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "_cuda_kernels*.so")))
    return found[0] if found else None


@functools.cache
def library() -> CudaKernels | None:
    """The CUDA kernels: AIGC_RT_CUDA_LIB's build if set, else the installed one; None if there is none."""
    path = os.environ.get("AIGC_RT_CUDA_LIB") or installed_path()
    return CudaKernels(path) if path else None
