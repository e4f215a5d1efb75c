"""Shared launcher helpers for the Triton kernels: interpreter detection, block sizes (chosen here, in one
place), grid sizing, and host-side argument checks that raise ValueError naming the problem.

Tests: tests/test_triton_kernels.py (every launcher's bad-input checks go through `check_tensor`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _probe_kernel():
    pass


# True when @triton.jit built interpreter functions (TRITON_INTERPRET=1 when the kernels were imported):
# kernels then run on CPU tensors, one program at a time, in NumPy.
INTERPRETER = isinstance(_probe_kernel, InterpretedFunction)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why this triton's interpreter cannot run with this numpy, or None. Before 3.7 the interpreter turns a
    scalar kernel argument into an int with int(1-element array), which numpy 2.4 refuses: every kernel with a
    `range(..., K, ...)` loop would fail deep inside the interpreter."""
    def major_minor(text: str) -> tuple[int, int]:
        return tuple(int(part) for part in text.split(".")[:2])
    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"triton {triton_version}'s interpreter (TRITON_INTERPRET=1) does not work with numpy "
                f"{numpy_version}: install triton>=3.7 or numpy<2.4")
    return None


if INTERPRETER and (problem := interpreter_problem(triton.__version__, np.__version__)):
    raise ImportError(problem)


def patch_language_once() -> bool:
    """Make the interpreter patch triton.language once per kernel launch instead of once per call of a @triton.jit
    library function (tl.sum, tl.max, tl.zeros, tl.cdiv...) inside it. triton's interpreter re-patches the whole
    language (every builtin of tl, tl.core, tl.math, tl.tensor: ~2 ms) on each such call, in every program, and
    never undoes those patches: a launch of a few thousand programs that each call tl.sum spent seconds there,
    a third of the test suite's interpreter time. The patch a launch makes stays in force until its end, when
    triton restores the language; a call inside it whose modules are already patched patches nothing. Returns
    whether it applied (False where this triton's interpreter lacks the hook, which leaves it as it was)."""
    import inspect
    from triton.runtime import interpreter
    patch, scope_type = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    if patch is None or scope_type is None or getattr(patch, "once", False):
        return getattr(patch, "once", False)
    patched: set[int] = set()  # the language modules patched in the launch running now
    modules: dict[object, frozenset[int]] = {}  # function -> the language modules it sees (what triton patches)

    def patch_lang(fn):
        langs = modules.get(fn)
        if langs is None:
            langs = modules[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                            if inspect.ismodule(v) and v in (tl, tl.core))
        if patched and langs <= patched:
            return scope_type()  # already in force: nothing to undo
        launch = not patched
        scope = patch(fn)
        patched.update(langs)
        if launch:  # the launch's own patch, which triton restores when the launch ends
            restore = scope.restore

            def restore_launch():
                patched.clear()
                restore()
            scope.restore = restore_launch
        return scope
    patch_lang.once = True
    interpreter._patch_lang = patch_lang
    return True


def interpreter_overflow_checks(on: bool) -> None:
    """Turn the interpreter's int32 overflow checks on or off: with them on (triton's default there) every integer
    add, subtract and multiply of a kernel is redone in int64 and asserted in range, a fifth of the interpreter's
    time. A compiled kernel checks only with TRITON_DEBUG=1, so the interpreter here does the same: off unless
    TRITON_DEBUG=1 (the index arithmetic that could overflow at real sizes is int64 in these kernels, and the
    interpreter runs test sizes)."""
    from triton.runtime import interpreter
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is not None and hasattr(options, "sanitize_overflow"):
        builder.options = dataclasses.replace(options, sanitize_overflow=on)


if INTERPRETER:
    patch_language_once()
    interpreter_overflow_checks(os.environ.get("TRITON_DEBUG", "0") not in ("", "0"))


# Autotuned launches (linear.py, mlp.py). triton's autotuner compiles its candidates one after another on the first
# launch of each shape, so with ~10-20 candidates per shape a GPU session spent much of its first minutes compiling.
# launch_tuned compiles a new shape's candidates at once on a pool of threads first (triton's AsyncCompileMode, 3.4
# and later: its compiler releases the GIL; 2 threads compiled 12 GEMV variants in half the time of one here), and
# the autotuner then finds them compiled and only times them.
COMPILE_THREADS = min(16, os.cpu_count() or 1)
_compile_pool = None
_precompiled: set[tuple] = set()  # (autotuner, sizes, dtypes) of the launches seen
_precompile_failed: list[Exception] = []  # the first failure (warned about once)
# (kernel name, the autotuner's key) -> {Config: its timing (ms, or [median, 20th, 80th percentile])}: every shape
# launch_tuned saw tuned in this process, for bench/gpu_profile.py to say how the candidates compared
tuning_log: dict[tuple, dict] = {}


@functools.lru_cache(maxsize=None)
def _key_positions(tuned) -> tuple[int, ...]:
    """Where the autotuner's `key` arguments sit among a launch's positional arguments."""
    return tuple(tuned.arg_names.index(k) for k in tuned.keys)


def _tuning_key(tuned, args: tuple, kwargs: dict) -> tuple:
    """The key triton's Autotuner.run caches a shape's choice under: its `key` arguments and the tensors' dtypes."""
    named = {**dict(zip(tuned.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in tuned.arg_names}
    return (*(named[k] for k in tuned.keys if k in named), *(str(v.dtype) for v in named.values()
                                                           if hasattr(v, "dtype")))


def precompile(tuned, grid, args: tuple, kwargs: dict) -> int:
    """Compile every candidate `tuned` (a triton.autotune'd kernel) would time for this launch, on COMPILE_THREADS
    threads; returns how many were submitted. A compile that fails is left for the autotuner to meet again (it
    gives that candidate an infinite time)."""
    global _compile_pool
    from concurrent.futures import ThreadPoolExecutor
    from triton.runtime._async_compile import AsyncCompileMode
    if _compile_pool is None:
        _compile_pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="aigc_rt-compile")
    tuned.nargs = dict(zip(tuned.arg_names, args))  # as Autotuner.run sets them for its pruning
    try:
        configs = tuned.prune_configs(kwargs)
    finally:
        tuned.nargs = None
    with AsyncCompileMode(_compile_pool, ignore_errors=True):
        for c in configs:
            tuned.fn.warmup(*args, grid=grid, **kwargs, **c.all_kwargs())
    return len(configs)


def launch_tuned(tuned, grid, *args, **kwargs):
    """tuned[grid](*args, **kwargs), with a new shape's candidates compiled in parallel first (precompile) on a GPU.
    Anything going wrong there (an older triton, an API that moved) is warned about once and leaves the launch to
    the autotuner alone, which compiles the candidates in turn as before."""
    if INTERPRETER:
        return tuned[grid](*args, **kwargs)
    # per launch, so cheap first (~3 us in Python): the shape's sizes and dtypes, seen before or not
    seen = (id(tuned), *(args[i] for i in _key_positions(tuned)),
            *(a.dtype for a in args if isinstance(a, torch.Tensor)))
    key = None
    if seen not in _precompiled:
        _precompiled.add(seen)
        key = _tuning_key(tuned, args, kwargs)
        # a CUDA-graph capture runs only shapes its eager step has tuned: nothing to compile there
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if key in tuned.cache:
            key = None
        elif not capturing:
            try:
                precompile(tuned, grid, args, kwargs)
            except Exception as e:  # noqa: BLE001 (an optimisation: never worth failing the launch for)
                if not _precompile_failed:
                    _precompile_failed.append(e)
                    warnings.warn(f"aigc_rt: compiling autotune candidates in parallel failed ({type(e).__name__}: "
                                  f"{e}); the autotuner compiles them one by one", RuntimeWarning, stacklevel=2)
    result = tuned[grid](*args, **kwargs)
    if key is not None and getattr(tuned, "configs_timings", None):  # this launch tuned the shape: keep its times
        tuning_log[(getattr(tuned, "base_fn", tuned.fn).__name__, key)] = dict(tuned.configs_timings)
    return result


def device_fn(fn):
    """@triton.jit for helpers that kernels call. Under the interpreter a helper runs as plain Python in its
    caller's already patched triton.language (an interpreted @triton.jit helper re-patches the whole
    language on every call, about 1 ms, which would dominate the interpreter's run time)."""
    return fn if INTERPRETER else triton.jit(fn)


# Programmatic dependent launch (Hopper and later; AIGC_RT_PDL=1, off by default until measured on a GPU): the
# decode-path kernels are launched so that the next one's programs can be resident while the one before drains,
# which hides most of the ~2 us a launch costs even inside a CUDA graph (bench/gpu_profile.py: a 124M decode
# step is 119 launches of 1-4 us). Correct only if every such kernel waits (gdc_wait) before it reads what the
# kernel before wrote or writes anything: pdl_begin does that first thing.
PDL_REQUESTED = not INTERPRETER and os.environ.get("AIGC_RT_PDL") == "1"


def pdl_options(device: torch.device) -> dict:
    """Launch options for a kernel that starts with pdl_begin(PDL): PDL on where asked for and supported."""
    if PDL_REQUESTED and _capability(device)[0] >= 9:
        return dict(PDL=True, launch_pdl=True)
    return dict(PDL=False)


_capability = functools.lru_cache(torch.cuda.get_device_capability)  # called per launch: asked once


@device_fn
def pdl_begin(PDL: tl.constexpr):
    """With PDL: wait until the kernel before this one has finished and its writes are visible, then let the
    next kernel's programs launch (they wait in turn). Call it before any load of a computed input or any store."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


# L2 prefetch (Hopper and later): a program asks the L2 cache for its rows of a weight matrix with one bulk
# prefetch per row (the copy engine fetches them), so that a weight-streaming kernel has all its bytes requested
# from its first instruction, and under PDL before it waits for the kernel before. Changes no value.
PREFETCH_MAX_BYTES = 128 << 10  # per program: resident programs x this stays well inside an H100's 50 MB L2


def l2_prefetchable(t: torch.Tensor, row_bytes: int) -> bool:
    """Whether prefetch_l2 may be pointed at rows of t that are row_bytes apart: a Hopper or later GPU, and every
    row start 16-byte aligned (the bulk prefetch's rule for addresses and sizes)."""
    return (t.device.type == "cuda" and _capability(t.device)[0] >= 9 and t.data_ptr() % 16 == 0
            and row_bytes % 16 == 0)


if INTERPRETER:
    def prefetch_l2(ptr, rows, row_bytes, row_stride):
        """No-op: the interpreter has no cache to warm."""
else:
    @triton.jit
    def prefetch_l2(ptr, rows, row_bytes, row_stride):
        """Ask L2 for `rows` ranges of row_bytes each, row_stride bytes apart, from ptr on (sizes and addresses
        multiples of 16; rows <= the program's threads): thread t < rows issues one cp.async.bulk.prefetch for
        range t. Loads of that memory afterwards hit L2 or join the request."""
        tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .b32 t; .reg .b64 a; mov.u32 t, %tid.x; setp.lt.u32 p, t, $3; "
            "mad.wide.u32 a, t, $4, $1; @p cp.async.bulk.prefetch.L2.global [a], $2; mov.b32 $0, 0; }",
            "=r,l,r,r,r", [ptr.to(tl.int64, bitcast=True), row_bytes, rows, row_stride], dtype=tl.int32,
            is_pure=False, pack=1)


# A fence by the calling thread, acquire-release at GPU scope (kernels/mlp.py: before a program counts itself done,
# and after the last one learns it is, so that the others' partial sums written before are the ones it reads).
if INTERPRETER:
    def fence_gpu():
        """No-op: the interpreter runs one program at a time."""
else:
    @triton.jit
    def fence_gpu():
        """fence.acq_rel.gpu, executed by every thread of the program."""
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, $1;", "=r,r", [tl.program_id(0)], dtype=tl.int32,
                                  is_pure=False, pack=1)


# Partial results of a launch added up inside it, without float atomics (kernels/mlp.py, the decode attention's
# output projection): each program writes its partial row, counts itself in, and the last to arrive adds them.
COUNTERS = 1 << 14  # int32 counters in a new_counters() buffer: rows x (groups + 1) of one launch must fit


def new_counters(device) -> torch.Tensor:
    """A counter buffer for the kernels that gather partials (gather_partials): zeros, and left zeros by every
    launch that uses it. Allocate it outside any CUDA-graph capture (a capture would record the zeroing) and keep
    it: TritonBackend holds one. Launches that share one must not run concurrently."""
    return torch.zeros(COUNTERS, dtype=torch.int32, device=device)


def checked_counters(counters, needed: int, device: torch.device, who: str) -> torch.Tensor:
    """A launch's counter buffer: the caller's, checked (contiguous int32, at least `needed` of them), or a new one
    where no CUDA graph is being captured (a capture would record its zeroing); ValueError naming the problem."""
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"{who}: pass counters= (kernels.utils.new_counters, made before the capture) while a "
                             f"CUDA graph is being captured")
        return new_counters(device)
    check_tensor("counters", counters, 1, (torch.int32,), device)
    if not counters.is_contiguous() or counters.numel() < needed:
        raise ValueError(f"counters must be a contiguous int32 buffer of at least {needed}, got "
                         f"{tuple(counters.shape)}")
    return counters


@device_fn
def arrive(counter_ptr, expected):
    """Count this program into a counter shared by `expected` programs; True for the last to arrive, which also
    sets the counter back to 0. Every thread's stores before the call are visible to the program that gets True
    (every thread fences, the block synchronises, one atomic with acquire-release order; the last arrival
    fences again before its threads read what the others wrote)."""
    fence_gpu()
    tl.debug_barrier()
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel") == expected - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed")
        fence_gpu()
    return last


@device_fn
def column_sums(src_ptr, n, C, cols, in_c, rs, RBLOCK: tl.constexpr, ROWS: tl.constexpr):
    """sum over i < n of src[i * C + cols], (RBLOCK,): ROWS rows a tile (every load of a tile in flight at once),
    tiles in index order and tl.sum's fixed tree within one, so the same bits whichever program calls it. src
    was written by other programs: read from L2 (.cg), past this SM's L1."""
    acc = tl.zeros((RBLOCK,), dtype=tl.float32)
    for i0 in range(0, n, ROWS):
        tile = tl.load(src_ptr + (i0 + rs[:, None]) * C + cols[None, :], mask=(i0 + rs[:, None] < n) & in_c[None, :],
                       other=0.0, cache_modifier=".cg")
        acc += tl.sum(tile, axis=0)
    return acc


@device_fn
def gather_partials(part_row, s, n, C, counters, rc, rr, RBLOCK: tl.constexpr, GROUP: tl.constexpr):
    """Program s of n has written its partial row part_row[s * C + c] (c < C): group the n rows GROUP at a time;
    the last of a group to arrive (its counter, counters + group) adds the group's rows in index order into
    part_row[(n + group) * C + c], and the last group (counter counters + n_groups) gets last = True: it alone
    may read the n_groups group sums (column_sums(part_row + n * C, n_groups, ...)). Returns (last, n_groups).
    part_row holds n + ceil(n / GROUP) rows of C, counters ceil(n / GROUP) + 1 zeros (left zeros). rc, rr:
    tl.arange(0, RBLOCK) and tl.arange(0, GROUP)."""
    n_groups = tl.cdiv(n, GROUP)
    group = s // GROUP
    first = group * GROUP
    size = tl.minimum(GROUP, n - first)
    last = s < 0  # False (a tensor, as arrive's answer is)
    if arrive(counters + group, size):
        for c0 in range(0, C, RBLOCK):
            cols = c0 + rc
            in_c = cols < C
            tl.store(part_row + (n + group) * C + cols, column_sums(part_row + first * C, size, C, cols, in_c, rr,
                                                                    RBLOCK, GROUP), mask=in_c)
        last = arrive(counters + n_groups, n_groups)
    return last, n_groups


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256


def check_tensor(name: str, t, ndim: int | None = None, dtypes=None, device: torch.device | None = None,
                 last_contiguous: bool = False) -> None:
    """ValueError unless t is a tensor with the given rank, one of `dtypes`, on `device`; with
    last_contiguous, its last dimension must have stride 1 (other strides are passed to the kernel)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if INTERPRETER and t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}: under TRITON_INTERPRET=1 the kernels run on CPU tensors")
    if not INTERPRETER and t.device.type != "cuda":
        raise ValueError(f"{name} is on {t.device}: the Triton kernels need CUDA tensors "
                         f"(set TRITON_INTERPRET=1 before importing them to run on the CPU)")
    if last_contiguous and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_vector(name: str, t, n: int, dtypes, device: torch.device | None) -> None:
    """check_tensor for a contiguous (n,) tensor (a bias, a scale, per-row lengths...): ValueError otherwise."""
    check_tensor(name, t, 1, dtypes, device)
    if t.shape[0] != n or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous ({n},) tensor, got {tuple(t.shape)}")


def check_scale(name: str, t: torch.Tensor, scale, device: torch.device) -> None:
    """int8 tensors come with per-row fp32 scales (rows,), and only they do: ValueError otherwise."""
    if (t.dtype == torch.int8) != (scale is not None):
        raise ValueError(f"a scale is required for int8 {name}s and only for them ({name} {t.dtype}, "
                         f"scale {'given' if scale is not None else 'missing'})")
    if scale is not None:
        check_vector("scale", scale, t.shape[0], (torch.float32,), device)


def check_caches(k_cache, v_cache, B: int, H: int, D: int, device: torch.device, like: str) -> None:
    """ValueError unless k_cache and v_cache are (B, H, S, D) float tensors of one shape (last dim contiguous)."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, 4, FLOAT_DTYPES, device, last_contiguous=True)
        if t.shape[:2] != (B, H) or t.shape[3] != D:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({B}, {H}, S, {D}) to match {like}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)}, k_cache has {tuple(k_cache.shape)}")


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two non-empty tensors' byte spans intersect (first to last element, strides included)."""
    def span(t):
        last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()
    (a0, a1), (b0, b1) = span(a), span(b)
    return a.numel() > 0 and b.numel() > 0 and a0 < b1 and b0 < a1


def check_out(out, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              strided: bool = False, name: str = "out") -> torch.Tensor:
    """The output tensor: `out` when given (checked: shape, dtype, device, contiguous; with strided, a kernel
    that takes the output's strides needs only its last dimension contiguous), else a new one. name: what the
    errors call it (e.g. a residual that is written in place)."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_tensor(name, out, len(shape), (dtype,), device, last_contiguous=strided)
    if tuple(out.shape) != tuple(shape) or not (strided or out.is_contiguous()):
        raise ValueError(f"{name} must be a {'' if strided else 'contiguous '}{tuple(shape)} tensor, got "
                         f"{tuple(out.shape)} with strides {out.stride()}")
    return out


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device; under the interpreter a small number, so that grid-sizing
    logic (splits, row blocks) is still exercised with several programs."""
    if INTERPRETER:
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def row_settings(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for layernorm.py: one row of n elements per program, all of it in registers."""
    block = triton.next_power_of_2(max(n, 16))
    if INTERPRETER:
        return block, 1
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16


def sampling_settings(V: int, do_sample: bool = True, interpreter: bool = INTERPRETER) -> dict:
    """For sampling.py: CHUNK, the logits each program of the split path holds (a row is cut into chunks, one
    program each); BLOCK, the part of a row streamed per step where one program streams a whole row; pivots per
    search pass. Several chunks and blocks per row even at test sizes, so the split path and the carried state
    are exercised. Greedy keeps per-lane state only (no reduction inside its loop), so it streams 4x longer
    blocks: fewer dependent iterations over a 50k vocabulary. HELD_PIVOTS, the pivots of a search over values
    held in registers (a chunk, or the merge's candidates): 8 keep a (2048, 8) comparison tile there.
    interpreter=False gives a GPU's settings anywhere (a test runs them under the interpreter)."""
    if interpreter:
        return dict(CHUNK=256, BLOCK=1024, N_PIVOTS=64, HELD_PIVOTS=64, num_warps=1)
    return dict(CHUNK=2048, BLOCK=min(1024 if do_sample else 4096, triton.next_power_of_2(V)), N_PIVOTS=16,
                HELD_PIVOTS=8, num_warps=8)


def linear_settings(M: int, N: int, device: torch.device, interpreter: bool = INTERPRETER) -> dict:
    """Tile sizes for linear.py's GEMM. Small M (batched decode, M <= 16) is weight-bandwidth bound: one
    16-row tile of x, column tiles narrow enough for two programs per SM; larger M is a plain GEMM tile.
    The interpreter gets wide tiles (its cost is per program and per op, not per element).
    interpreter=False here and below: a GPU's settings anywhere (tests run them under the interpreter)."""
    if interpreter:
        return dict(BLOCK_M=16 if M <= 16 else 32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1)
    if M <= 16:
        block_n = 32 if N >= 32 * 2 * num_sms(device) else 16
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, num_warps=4, num_stages=4)
    # 8 warps for the 128 x 128 tile: with 4, ptxas spills ~800 B a thread (tools/compile_triton_kernels.py)
    block_m = 64 if M <= 64 else 128
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=32, num_warps=8 if block_m == 128 else 4, num_stages=4)


def gemv_settings(N: int, dtype: torch.dtype, device: torch.device, interpreter: bool = INTERPRETER) -> dict:
    """Block sizes for linear.py's GEMV: 1-2 KiB of each weight row per iteration, row blocks narrow enough
    to put at least two programs on every SM."""
    if interpreter:
        return dict(BLOCK_N=128, BLOCK_K=128, num_warps=1)
    block_k = 256 if dtype == torch.float32 else 512
    return dict(BLOCK_N=8 if N >= 8 * 2 * num_sms(device) else 4, BLOCK_K=block_k, num_warps=4)


def mlp_settings(C: int, H: int, device: torch.device, interpreter: bool = INTERPRETER) -> dict:
    """Block shape for mlp.py's fused MLP without autotuning: hidden slices of 64 units (a bf16 W2 row's 128 B),
    fc and proj tiles of 8,192 weights, partials added 8 at a time. The interpreter (which pays per program, not
    per element): slices of 128 in groups of 2, so that both reduction stages run at test sizes."""
    if interpreter:
        return dict(BLOCK_H=128, BLOCK_K=128, BLOCK_C=128, GROUP=2, RBLOCK=128, THREADS=32, PREFETCH=False,
                    num_warps=1)
    return dict(BLOCK_H=64, BLOCK_K=128, BLOCK_C=128, GROUP=8, RBLOCK=1024, THREADS=256, PREFETCH=False, num_warps=8)


def attention_settings(head_dim: int, dtype: torch.dtype, interpreter: bool = INTERPRETER) -> dict:
    """Tile sizes for attention.py (prefill): head_dim padded to a power of two (>= 16, tl.dot's minimum)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreter:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=4, num_stages=1)
    # 8 warps: with 4, ptxas spills every one of these tiles (tools/compile_triton_kernels.py prints it)
    fp32 = dtype == torch.float32  # fp32 tiles take twice the registers and shared memory (and three bf16 parts of
    if fp32 and block_d > 128:     # each operand for the tensor cores: utils.dot_fp32)
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, num_warps=8, num_stages=2)
    if fp32 and block_d == 128:  # head_dim 80-128: 64 x 32 on 8 warps spilled ~64 B a thread; 64 x 16 on 4 does not
        return dict(BLOCK_M=64, BLOCK_N=16, BLOCK_D=block_d, num_warps=4, num_stages=2)
    small = fp32 or block_d > 128
    return dict(BLOCK_M=64 if small else 128, BLOCK_N=32 if small else 64, BLOCK_D=block_d, num_warps=8,
                num_stages=2 if small else 3)


BLOCK_SHAPES = ("fused", "wide", "spread")  # decode_attention.attention_block's launch shapes (decode_settings)
SINGLE_PASS_BLOCKS = 4  # decode attention over caches of up to 4 x 64 positions: one pass, no merge


def decode_settings(batch_heads: int, max_len: int, head_dim: int, device: torch.device,
                    interpreter: bool = INTERPRETER, shape: str = "fused") -> dict:
    """Split-K layout for decode_attention.py, from the cache's capacity (never a per-step length, so a
    CUDA graph can be captured once): enough (row, head, split) programs to cover every SM twice. With the output
    projection fused: W's outputs in PROJ_SLICES slices, BLOCK_C outputs per tile of W (8,192 weights a tile),
    partials added GROUP at a time in RBLOCK-column tiles (the interpreter: heads in groups of 2, so that both
    stages run at test sizes); with the qkv linear fused too (attention_block), BLOCK_K inputs per step of its GEMV
    (three tiles of 4,096 weights: q's, k's and v's rows). The attention block's other launch shapes (timed against
    it on a GPU): "wide", the qkv GEMV's tiles four times as wide on 8 warps, a quarter of the dependent steps over
    C, 96 KB of weights in flight per step (sm_90: 179 registers, no spills); "spread", a head's 3 * head_dim rows
    of W_qkv spread over QKV_SLICES programs of QKV_ROWS rows each (enough programs to cover every SM twice),
    BLOCK_K inputs a step (tiles of 8,192 weights), QKV_STAGES steps in flight. PROJ_STAGES: the fused output
    projection's loop over W's tiles software-pipelined (decode_attention._project)."""
    if shape not in BLOCK_SHAPES:
        raise ValueError(f"shape must be one of {BLOCK_SHAPES}, got {shape!r}")
    block_n = 16 if interpreter else 64
    block_d = triton.next_power_of_2(max(head_dim, 16))
    target_splits = triton.cdiv(2 * num_sms(device), batch_heads)
    blocks = triton.cdiv(max_len, block_n)
    # up to SINGLE_PASS_BLOCKS blocks of positions, one program per row and head reads them all (a few dependent
    # iterations cost less than the merge's launch); the interpreter's bound is lower, so tests run both ways
    n_splits = 1 if blocks <= (2 if interpreter else SINGLE_PASS_BLOCKS) else min(target_splits, blocks)
    split_len = triton.cdiv(triton.cdiv(max_len, n_splits), block_n) * block_n
    # the projection's outputs cut into PROJ_SLICES slices, (row, head, slice) programs: ~2 per SM, at most 4 (each
    # program of a one-pass attention attends again for its slice: cheap beside W for a short cache)
    slices = min(4, target_splits)
    wide = shape == "wide"
    proj = dict(BLOCK_C=128, GROUP=2, RBLOCK=128, BLOCK_K=128 if wide else 64) if interpreter else dict(
        BLOCK_C=max(16, 8192 // block_d), GROUP=8, RBLOCK=1024, BLOCK_K=max(16, (16384 if wide else 4096) // block_d))
    spread = {}
    if shape == "spread":
        rows = max(16, triton.next_power_of_2(triton.cdiv(3 * head_dim, target_splits)))
        spread = dict(QKV_ROWS=rows, QKV_SLICES=triton.cdiv(3 * head_dim, rows), QKV_STAGES=1 if interpreter else 3)
        proj["BLOCK_K"] = 64 if interpreter else max(16, 8192 // rows)
    return dict(BLOCK_N=block_n, BLOCK_D=block_d, SPLIT_LEN=split_len, n_splits=triton.cdiv(max_len, split_len),
                num_warps=1 if interpreter else 8 if wide else 4, PROJ_SLICES=slices, PROJ_STAGES=3, **proj, **spread)


CONV_ACTS = {"none": 0, "relu": 1, "tanh": 2, "leaky_relu": 3, "sigmoid": 4}  # as csrc/cpu/conv_isa.h's Act


def check_conv(x: torch.Tensor, w: torch.Tensor, bias, act: str, transposed: bool) -> tuple[int, ...]:
    """The convolutions' shared argument checks -> (N, C_in, H, W, C_out, k). w is (C_in, C_out, k, k) when
    transposed, else (C_out, C_in, k, k); x and w float32 or bfloat16."""
    layout = "(C_in, C_out, k, k)" if transposed else "(C_out, C_in, k, k)"
    floats = (torch.float32, torch.bfloat16)
    if x.dim() != 4 or w.dim() != 4 or x.dtype not in floats or w.dtype not in floats:
        raise ValueError(f"x (N, C_in, H, W) and w {layout} must be float32 or bfloat16, got {x.dtype} "
                         f"{tuple(x.shape)} and {w.dtype} {tuple(w.shape)}")
    n, c_in, h, wd = x.shape
    c_out, k = w.shape[1 if transposed else 0], w.shape[2]
    if w.shape[0 if transposed else 1] != c_in or w.shape[3] != k:
        raise ValueError(f"w {tuple(w.shape)} must be {layout.replace('C_in', f'C_in={c_in}')} with a square kernel")
    if bias is not None and (bias.shape != (c_out,) or bias.dtype != torch.float32):
        raise ValueError(f"bias must be float32 ({c_out},), got {bias.dtype} {tuple(bias.shape)}")
    if act not in CONV_ACTS:
        raise ValueError(f"act must be one of {sorted(CONV_ACTS)}, got {act!r}")
    return n, c_in, h, wd, c_out, k


def conv_out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The convolutions' output type: float32, or bfloat16 (the fp32 result rounded) for a next layer that rounds
    its input to bf16 anyway."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    return dtype


def conv_settings(c_in: int, c_out: int) -> dict:
    """Block sizes and warps of the convolutions' implicit GEMMs (kernels/conv2d.py, conv_transpose.py): tl.dot
    needs >= 16 on every side; wider where the channels are. 8 warps: with 4, the 64 x 64 fp32 tiles spill at
    sm_90 (255 registers, 12-176 B; tools/compile_triton_kernels.py)."""
    return dict(BLOCK_M=64, BLOCK_N=max(16, min(64, triton.next_power_of_2(c_out))),
                BLOCK_K=max(16, min(32, triton.next_power_of_2(c_in))), num_warps=8)


@device_fn
def conv_tap(acc, x_row, row_ok, w_tap, co, co_ok, C_in, sxc, swi, swo, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr, WIDEN_DOT: tl.constexpr):
    """One tap of a convolution as an implicit GEMM: acc (BLOCK_M, BLOCK_N) + x[pixel, 0:C_in] @ w[0:C_in, co],
    where x_row (BLOCK_M,) points at each output pixel's input pixel for this tap (rows not row_ok read zeros:
    outside the image), w_tap at the tap's (C_in, C_out) weights (strides swi, swo), in BLOCK_K channel steps.
    The input is multiplied in the weights' type (conv_dot)."""
    ck = tl.arange(0, BLOCK_K)
    for c0 in range(0, C_in, BLOCK_K):
        ci = c0 + ck  # (BLOCK_K,)
        ci_ok = ci < C_in
        a = tl.load(x_row[:, None] + ci[None, :] * sxc, mask=row_ok[:, None] & ci_ok[None, :], other=0.0)
        b = tl.load(w_tap + ci[:, None] * swi + co[None, :] * swo, mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
        acc = conv_dot(acc, a, b, PRECISION, WIDEN_DOT)  # (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_N)
    return acc


# fp32 convolutions at "ieee" precision multiply on the tensor cores through dot_fp32 (six bf16 dots, an fp32
# product's result to fp32 rounding) on a GPU; the interpreter takes one fp32 dot instead (the split's six dots
# quadrupled its convolution tests' time; dot_fp32 itself is tested through the linear and the prefill attention),
# except where a test turns this on to run the GPU's branch
SPLIT_FP32_CONVS = not INTERPRETER


def conv_precision(input_precision: str) -> str:
    """The convolution kernels' PRECISION for a launcher's input_precision ("ieee" or "tf32"): "bf16x6" for "ieee"
    where fp32 products go through dot_fp32 (SPLIT_FP32_CONVS), else as given."""
    if input_precision not in ("ieee", "tf32"):
        raise ValueError(f"input_precision must be 'ieee' or 'tf32', got {input_precision!r}")
    return "bf16x6" if input_precision == "ieee" and SPLIT_FP32_CONVS else input_precision


@device_fn
def conv_dot(acc, a, b, PRECISION: tl.constexpr, WIDEN_DOT: tl.constexpr):
    """acc + a @ b with the input block a in the weights' type: fp32 weights multiply it as it is (a bf16 input
    exactly widened; PRECISION "bf16x6": dot_fp32's six bf16 tensor-core dots, fp32 accuracy; "ieee": one fp32 dot;
    "tf32"), bf16 weights round it to bf16 (cast_rne: to nearest even, as torch's .to(torch.bfloat16)) and run bf16
    tensor-core products, exact, summed in fp32 (dot; WIDEN_DOT for the interpreter)."""
    if b.dtype == tl.bfloat16:  # decided at compile time (the else must be explicit: both would compile)
        return dot(cast_rne(a.to(tl.float32), tl.bfloat16), b, acc, WIDEN_DOT)
    elif PRECISION == "bf16x6":
        return dot_fp32(a.to(tl.float32), b, acc, WIDEN_DOT)
    else:
        return tl.dot(a.to(tl.float32), b, acc, input_precision=PRECISION)


@device_fn
def conv_epilogue(acc, b_ptr, co, co_ok, slope, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    """act(acc + bias[co]) for the convolutions, ACT a CONV_ACTS code: tanh as 1 - 2 / (e^2y + 1) (exp overflow ->
    inf gives exactly 1), sigmoid from e = exp(-|y|) in (0, 1] (1 / (1 + e) for y >= 0, e / (1 + e) below: no
    overflow, no cancellation where it is tiny), leaky ReLU with the runtime `slope`."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co_ok, other=0.0)[None, :]
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 2:
        acc = 1.0 - 2.0 / (tl.exp(2.0 * acc) + 1.0)
    elif ACT == 3:
        acc = tl.where(acc >= 0.0, acc, acc * slope)
    elif ACT == 4:
        e = tl.exp(-tl.abs(acc))
        acc = tl.where(acc >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
    return acc


@device_fn
def gelu_tanh(y):
    """GELU, tanh approximation (GPT-2's): 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))), with
    tanh(a) = 1 - 2 / (exp(2a) + 1) (saturates correctly at +-inf; tl has no tanh of its own)."""
    a = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    return 0.5 * y * (2.0 - 2.0 / (tl.exp(2.0 * a) + 1.0))


@device_fn
def cast_rne(x, dtype: tl.constexpr):
    """fp32 x -> `dtype`, rounding to nearest even. For bf16 the rounding is done on the bits, because the
    interpreter's fp32 -> bf16 cast truncates (the GPU's rounds to nearest even; this matches both)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(dtype)


@device_fn
def cast_to(x, dtype: tl.constexpr):
    """fp32 x rounded to `dtype` (cast_rne) and back to fp32, as a kernel rounds a linear's input to its weights'
    dtype; fp32 x unchanged."""
    return cast_rne(x, dtype).to(tl.float32)


@device_fn
def split_bf16x3(x):
    """fp32 x -> (hi, mid, lo), three bf16 tensors with hi + mid + lo == x exactly: hi is x cast to bf16, mid the
    remainder x - hi cast to bf16, lo the remainder after that, at most 8 significant bits, so bf16 holds it (each
    subtraction is exact in fp32, whether a cast rounds, as the GPU's does, or truncates, as the interpreter's;
    exact for |x| above ~1e-33, where lo is not subnormal). Three bf16 tensor-core dots with an operand exact in
    bf16 (int8 weights) then give what one fp32 dot would, to fp32 rounding."""
    hi = x.to(tl.bfloat16)
    rest = x - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    return hi, mid, (rest - mid.to(tl.float32)).to(tl.bfloat16)


@device_fn
def dot_fp32(a, b, acc, WIDEN: tl.constexpr):
    """acc + a @ b for fp32 a and b on the bf16 tensor cores: each split into three bf16 parts (split_bf16x3), the
    six products of parts down to 2^-16 of the leading one summed smallest first, the three dropped below 2^-24 of
    it: an fp32 dot's result to fp32 rounding, where tl.dot's "ieee" fp32 runs on the FMA pipes (at most ~1/15 of
    Hopper's bf16 rate) and TF32 keeps only 10 bits. WIDEN: dot's, for the interpreter."""
    ah, am, al = split_bf16x3(a)
    bh, bm, bl = split_bf16x3(b)
    acc = dot(am, bm, acc, WIDEN)
    acc = dot(al, bh, acc, WIDEN)
    acc = dot(ah, bl, acc, WIDEN)
    acc = dot(am, bh, acc, WIDEN)
    acc = dot(ah, bm, acc, WIDEN)
    return dot(ah, bh, acc, WIDEN)


@device_fn
def dot_at(a, b, acc, WIDEN: tl.constexpr):
    """acc + a @ b at b's precision: an fp32 b (and a) through dot_fp32's six bf16 tensor-core dots, a 16-bit b in
    one dot with a in its dtype (an fp32 a rounded to it first, cast_rne, as linear.py rounds x to W's dtype)."""
    if b.dtype == tl.float32:
        return dot_fp32(a, b, acc, WIDEN)
    elif a.dtype == tl.float32:
        return dot(cast_rne(a, b.dtype), b, acc, WIDEN)
    else:
        return dot(a, b, acc, WIDEN)


@device_fn
def dot(a, b, acc, WIDEN: tl.constexpr):
    """acc + a @ b, fp32 accumulation, fp32 operands in IEEE precision (never TF32). WIDEN computes 16-bit
    operands in fp32 (exact: their products fit an fp32 mantissa), for the interpreter, whose tl.dot cannot
    multiply bf16."""
    if WIDEN:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")
