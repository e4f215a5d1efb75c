"""Compile every Triton kernel of aigc_rt.kernels for a GPU target without a GPU (ptxas ships with triton),
in its main variants, to catch what the interpreter accepts but the compiler does not (types of
loop-carried values, unsupported ops, shared-memory overflows), and print what ptxas makes of each: shared
memory, registers per thread, bytes spilled.

    python tools/compile_triton_kernels.py [--arch 90] [--jobs N]  # exits non-zero on the first failure

Run by tests/test_triton_kernels.py::test_kernels_compile_for_gpu. Signatures are derived from each kernel's
parameters: `*_ptr` -> a pointer (fp32 unless listed), names in FLOATS -> fp32, everything else -> i32.
Each is compiled with the specialization a GPT-2 launch gets from triton's JIT (tt.divisibility 16 on every
pointer and on the sizes and strides that are multiples of 16 there: `aligned`), since without it every load
is scalar; each line also gives the widths of the kernel's global loads (`loads 16 B x 9, 4 B x 4`): a weight or
KV-cache load narrower than 16 B is a bandwidth bug.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ["TRITON_INTERPRET"] = "0"  # compile real kernels, whatever the caller's environment says

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from aigc_rt.kernels import (attention, conv2d, conv_transpose, decode_attention, embedding,  # noqa: E402
                             layernorm, linear, lstm, mlp, sampling, vae)
from aigc_rt.kernels.utils import CONV_ACTS  # noqa: E402

FLOATS = {"eps", "qk_scale", "temperature", "top_k", "top_p", "penalty", "slope"}
FIXED_POINTERS = {"len_ptr": "*i64", "pos_ptr": "*i64", "out_ptr": "*i64", "seen_ptr": "*u8", "count_ptr": "*i32"}
W16 = {"w_ptr": "*bf16"}
CONV = dict(KERNEL=4, HAS_BIAS=True, BLOCK_M=64)  # the DCGAN layers' (kernels/utils.py conv_settings)
W8 = {"w_ptr": "*i8"}
W4 = {"w_ptr": "*u8"}  # int4 nibble pairs (and fp32 scales per row and group of 64)
QKV = {f"{t}_ptr": "*{dtype}" for t in "qkvo"}
KV = {f"{t}_ptr": "*{dtype}" for t in "qkv"}
MLP16 = {"w1_ptr": "*bf16", "w2_ptr": "*bf16"}
MLP_FLAGS = dict(SCALED=False, HAS_BIAS1=True, HAS_BIAS2=True, GELU=True)  # GPT-2's: LayerNorm, biases, GELU
SPLIT_SAMPLING = {"stats_i_ptr": "*i64", "cand_i_ptr": "*i32"}

# (kernel, pointer dtypes (others: fp32), dtype, constexprs, num_warps): the variants the launchers use on a GPU.
# Compiled with triton's default num_stages (3), so the shared memory printed is an upper bound.
VARIANTS = [
    (layernorm._layernorm_kernel, {}, "fp32", dict(BLOCK_C=2048, PDL=True), 8),
    (layernorm._layernorm_kernel, {}, "fp32", dict(BLOCK_C=1024), 4),
    (linear._gemv_kernel, {}, "fp32", dict(SCALED=False, HAS_BIAS=True, GELU=True, BLOCK_N=8, BLOCK_K=256), 4),
    (linear._gemv_kernel, W16, "bf16", dict(SCALED=False, HAS_BIAS=False, GELU=False, BLOCK_N=4, BLOCK_K=512), 4),
    (linear._gemv_kernel, W16, "bf16", dict(SCALED=False, HAS_BIAS=True, GELU=True, BLOCK_N=16, BLOCK_K=1024,
                                            PDL=True), 8),
    (linear._gemv_kernel, W16, "bf16", dict(SCALED=False, HAS_BIAS=True, GELU=True, NORM=True, NORM_BLOCK=2048,
                                            BLOCK_N=8, BLOCK_K=512, PDL=True), 4),  # ln_2 + mlp.fc
    (linear._gemv_kernel, W16, "bf16", dict(SCALED=False, HAS_BIAS=True, GELU=True, NORM=True, NORM_BLOCK=2048,
                                            BLOCK_N=8, BLOCK_K=512, PREFETCH=True, PDL=True), 4),  # + L2 prefetch
    (linear._gemv_kernel, W16, "bf16", dict(SCALED=False, HAS_BIAS=True, GELU=True, NORM=True, NORM_BLOCK=2048,
                                            BLOCK_N=8, BLOCK_K=512, STAGES=3, PDL=True), 4),  # pipelined K loop
    (linear._gemv_kernel, W8, "int8", dict(SCALED=True, HAS_BIAS=True, GELU=False, ACCUMULATE=True, BLOCK_N=16,
                                           BLOCK_K=256, STAGES=3), 4),
    (linear._gemv_kernel, W16, "bf16", dict(SCALED=False, HAS_BIAS=False, GELU=False, NORM=True, NORM_BLOCK=1024,
                                            BLOCK_N=8, BLOCK_K=1024, PERSISTENT=4, PDL=True), 4),  # 124M ln_f + lm_head
    (linear._gemv_kernel, W16, "bf16", dict(SCALED=False, HAS_BIAS=False, GELU=False, NORM=True, NORM_BLOCK=2048,
                                            BLOCK_N=8, BLOCK_K=2048, PERSISTENT=2), 8),  # 1.5B's
    (linear._gemv_kernel, W8, "int8", dict(SCALED=True, HAS_BIAS=True, GELU=False, ACCUMULATE=True, BLOCK_N=4,
                                           BLOCK_K=4096, PERSISTENT=2), 8),  # 124M mlp_proj, int8
    (linear._gemv_kernel, {}, "fp32", dict(SCALED=False, HAS_BIAS=True, GELU=True, BLOCK_N=4, BLOCK_K=1024,
                                           PERSISTENT=4), 4),
    (linear._gemv_kernel, W8, "int8", dict(SCALED=True, HAS_BIAS=False, GELU=False, ACCUMULATE=True, BLOCK_N=4,
                                           BLOCK_K=1024, PREFETCH=True), 4),
    (linear._gemv_kernel, W16, "bf16", dict(SCALED=False, HAS_BIAS=True, GELU=False, ACCUMULATE=True, BLOCK_N=2,
                                            BLOCK_K=512), 1),  # attn.proj into the residual
    (linear._gemv_kernel, W8, "int8", dict(SCALED=True, HAS_BIAS=False, GELU=False, NORM=True, NORM_BLOCK=1024,
                                           BLOCK_N=4, BLOCK_K=2048), 8),  # ln_f + lm_head
    (linear._gemv_kernel, {}, "fp32", dict(SCALED=False, HAS_BIAS=True, GELU=True, NORM=True, NORM_BLOCK=2048,
                                           ACCUMULATE=True, BLOCK_N=4, BLOCK_K=1024, PDL=True), 4),  # both fusions
    (linear._gemv_kernel, W8, "int8", dict(SCALED=True, HAS_BIAS=True, GELU=False, BLOCK_N=4, BLOCK_K=512), 4),
    (linear._gemv_kernel, W16, "bf16", dict(SCALED=False, HAS_BIAS=True, GELU=False, RELU=True, BLOCK_N=8,
                                            BLOCK_K=512), 4),  # the Transformer decoder's feed-forward
    # ln_2 + mlp.fc of an int4 file
    (linear._gemv_int4_kernel, W4, "int4", dict(HAS_BIAS=True, GELU=True, NORM=True, NORM_BLOCK=2048, BLOCK_N=16,
                                                BLOCK_K=512, STAGES=3), 8),  # pipelined
    (linear._gemv_int4_kernel, W4, "int4", dict(HAS_BIAS=True, GELU=True, NORM=True, NORM_BLOCK=2048, BLOCK_N=8,
                                                BLOCK_K=1024, PDL=True), 4),
    (linear._gemv_int4_kernel, W4, "int4", dict(HAS_BIAS=True, GELU=False, ACCUMULATE=True, BLOCK_N=16,
                                                BLOCK_K=512), 8),  # mlp.proj into the residual
    (linear._linear_kernel, W8, "int8", dict(SCALED=True, HAS_BIAS=True, GELU=True, WIDEN_DOT=False, BLOCK_M=16,
                                             BLOCK_N=32, BLOCK_K=128), 4),
    (linear._linear_kernel, {}, "fp32", dict(SCALED=False, HAS_BIAS=True, GELU=True, WIDEN_DOT=False, BLOCK_M=16, BLOCK_N=32,
                                             BLOCK_K=128), 4),
    (linear._linear_kernel, W16, "bf16", dict(SCALED=False, HAS_BIAS=True, GELU=True, NORM=True, NORM_BLOCK=512,
                                              WIDEN_DOT=False, BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=4,
                                              PDL=True), 4),
    (linear._linear_kernel, W16, "bf16", dict(SCALED=False, HAS_BIAS=True, GELU=False, ACCUMULATE=True,
                                              WIDEN_DOT=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256), 4),
    (linear._linear_kernel, W16, "bf16", dict(SCALED=False, HAS_BIAS=True, GELU=False, ACCUMULATE=True,
                                              WIDEN_DOT=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=4,
                                              PREFETCH=True, PDL=True), 4),  # + L2 prefetch of its K range
    (linear._split_k_reduce_kernel, {}, "fp32", dict(SCALED=True, HAS_BIAS=True, GELU=True, ACCUMULATE=True,
                                                     SPLIT_K=4, BLOCK=1024, PDL=True), 4),
    (linear._linear_kernel, W16, "bf16", dict(SCALED=False, HAS_BIAS=True, GELU=True, WIDEN_DOT=False, BLOCK_M=128,
                                              BLOCK_N=128, BLOCK_K=32), 8),
    (linear._linear_kernel, W8, "int8", dict(SCALED=True, HAS_BIAS=True, GELU=True, WIDEN_DOT=False, BLOCK_M=128,
                                             BLOCK_N=128, BLOCK_K=32), 8),  # an int8 prefill: three dots a K block
    (linear._linear_kernel, {}, "fp32", dict(SCALED=False, HAS_BIAS=True, GELU=True, WIDEN_DOT=False, BLOCK_M=128,
                                             BLOCK_N=128, BLOCK_K=32), 8),  # an fp32 prefill: six dots a K block
    (linear._linear_kernel, {}, "fp32", dict(SCALED=False, HAS_BIAS=True, GELU=True, WIDEN_DOT=False, BLOCK_M=64,
                                             BLOCK_N=128, BLOCK_K=32), 4),
    (linear._linear_kernel, {"w_ptr": "*fp16"}, "fp16", dict(SCALED=False, HAS_BIAS=False, GELU=False, WIDEN_DOT=False,
                                                             BLOCK_M=64, BLOCK_N=128, BLOCK_K=32), 4),
    # the fused MLP (the autotuner's candidates' shapes): GPT-2's ln_2 + fc + GELU + mlp.proj + residual
    (mlp._mlp_kernel, MLP16, "bf16", dict(MLP_FLAGS, NORM=True, NORM_BLOCK=1024, BLOCK_H=64, BLOCK_K=128,
                                          BLOCK_C=128, GROUP=8, RBLOCK=1024, THREADS=256, PREFETCH=True, PDL=True), 8),
    (mlp._mlp_kernel, MLP16, "bf16", dict(MLP_FLAGS, NORM=True, NORM_BLOCK=2048, BLOCK_H=16, BLOCK_K=256,
                                          BLOCK_C=256, GROUP=8, RBLOCK=1024, THREADS=128), 4),
    (mlp._mlp_kernel, MLP16, "bf16", dict(MLP_FLAGS, NORM=True, NORM_BLOCK=2048, BLOCK_H=16, BLOCK_K=512,
                                          BLOCK_C=512, GROUP=8, RBLOCK=1024, THREADS=256), 8),
    (mlp._mlp_kernel, MLP16, "bf16", dict(MLP_FLAGS, NORM=True, NORM_BLOCK=2048, BLOCK_H=64, BLOCK_K=128,
                                          BLOCK_C=128, GROUP=16, RBLOCK=512, THREADS=256), 8),
    (mlp._mlp_kernel, MLP16, "bf16", dict(MLP_FLAGS, NORM=True, NORM_BLOCK=1024, BLOCK_H=16, BLOCK_K=256,
                                          BLOCK_C=256, GROUP=8, RBLOCK=1024, THREADS=128, STAGES=3, PDL=True), 4),
    (mlp._mlp_kernel, MLP16, "bf16", dict(MLP_FLAGS, NORM=True, NORM_BLOCK=1024, BLOCK_H=16, BLOCK_K=1024,
                                          BLOCK_C=1024, GROUP=8, RBLOCK=1024, THREADS=256), 8),  # a row in a step
    (mlp._mlp_kernel, {"w1_ptr": "*i8", "w2_ptr": "*i8"}, "int8", dict(MLP_FLAGS, SCALED=True, NORM=True,
     NORM_BLOCK=1024, BLOCK_H=32, BLOCK_K=128, BLOCK_C=128, GROUP=8, RBLOCK=1024, THREADS=128, STAGES=3), 4),
    (mlp._mlp_kernel, {"w1_ptr": "*i8", "w2_ptr": "*i8"}, "int8", dict(MLP_FLAGS, SCALED=True, NORM=True,
     NORM_BLOCK=1024, BLOCK_H=32, BLOCK_K=128, BLOCK_C=128, GROUP=8, RBLOCK=1024, THREADS=128), 4),
    (mlp._mlp_kernel, {}, "fp32", dict(MLP_FLAGS, BLOCK_H=64, BLOCK_K=64, BLOCK_C=64, GROUP=8, RBLOCK=1024,
                                       THREADS=128, RELU=True, GELU=False), 4),
    (attention._attention_kernel, QKV, "fp32", dict(HEAD_DIM=80, BLOCK_M=64, BLOCK_N=16, BLOCK_D=128,
                                                    WIDEN_DOT=False), 4),
    (attention._attention_kernel, QKV, "fp32", dict(HEAD_DIM=64, BLOCK_M=64, BLOCK_N=32, BLOCK_D=64,
                                                    WIDEN_DOT=False), 8),  # GPT-2's fp32 prefill
    (attention._attention_kernel, QKV, "bf16", dict(HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64, BLOCK_D=128,
                                                    WIDEN_DOT=False), 8),
    (attention._attention_kernel, QKV, "fp16", dict(HEAD_DIM=64, BLOCK_M=128, BLOCK_N=64, BLOCK_D=64,
                                                    WIDEN_DOT=False), 8),
    (attention._attention_kernel, QKV, "fp32", dict(HEAD_DIM=256, BLOCK_M=32, BLOCK_N=32, BLOCK_D=256,
                                                    WIDEN_DOT=False), 8),
    (decode_attention._decode_split_kernel, KV, "fp32", dict(HEAD_DIM=64, SPLIT_LEN=128, BLOCK_N=64, BLOCK_D=64,
                                                             APPEND=False, SINGLE=False), 4),
    (decode_attention._decode_split_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16"}, "bf16",  # fp32 q, bf16 cache
     dict(HEAD_DIM=80, SPLIT_LEN=64, BLOCK_N=64, BLOCK_D=128, APPEND=True, SINGLE=False, PDL=True), 4),
    (decode_attention._decode_split_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16"}, "bf16",  # one pass, no merge
     dict(HEAD_DIM=64, SPLIT_LEN=256, BLOCK_N=64, BLOCK_D=64, APPEND=True, SINGLE=True, PDL=True), 4),
    (decode_attention._decode_split_kernel, KV, "fp32", dict(HEAD_DIM=96, SPLIT_LEN=192, BLOCK_N=64, BLOCK_D=128,
                                                             APPEND=False, SINGLE=True), 4),
    (decode_attention._decode_merge_kernel, {"o_ptr": "*{dtype}"}, "fp16",
     dict(HEAD_DIM=64, SPLIT_LEN=128, BLOCK_S=32, BLOCK_D=64), 4),
    # with the output projection fused (decode_settings' GPU shapes): one pass, bf16 W; the merge, int8 W
    (decode_attention._decode_split_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16", "w_ptr": "*bf16"}, "bf16",
     dict(HEAD_DIM=64, SPLIT_LEN=256, BLOCK_N=64, BLOCK_D=64, APPEND=True, SINGLE=True, PDL=True, PROJ=True,
          HAS_BIAS=True, BLOCK_C=128, GROUP=8, RBLOCK=1024, PROJ_STAGES=3), 4),
    # the whole attention sub-layer (LN1 + qkv + attention + proj + residual; decode_attention.attention_block)
    (decode_attention._decode_split_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16", "w_ptr": "*bf16", "wq_ptr": "*bf16",
                                             "tot_ptr": "*fp32", "row_count_ptr": "*i32"}, "bf16",
     dict(HEAD_DIM=64, SPLIT_LEN=256, BLOCK_N=64, BLOCK_D=64, APPEND=True, SINGLE=True, PDL=True, PROJ=True,
          HAS_BIAS=True, BLOCK_C=128, GROUP=8, RBLOCK=1024, QKV=True, HAS_QKV_BIAS=True, NORM_BLOCK=1024,
          BLOCK_K=64), 4),
    (decode_attention._decode_split_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16", "w_ptr": "*bf16", "wq_ptr": "*bf16",
                                             "tot_ptr": "*fp32", "row_count_ptr": "*i32"}, "bf16",
     dict(HEAD_DIM=64, SPLIT_LEN=256, BLOCK_N=64, BLOCK_D=64, APPEND=True, SINGLE=True, PDL=True, PROJ=True,
          HAS_BIAS=True, BLOCK_C=128, GROUP=8, RBLOCK=1024, QKV=True, HAS_QKV_BIAS=True, NORM_BLOCK=1024,
          BLOCK_K=256), 8),  # its wide shape (decode_settings wide=True)
    # its spread shape (decode_settings shape="spread"): 124M batch 1 (16 q, k, v rows a program), 1.5B int8 (32)
    (decode_attention._attention_block_spread_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16", "w_ptr": "*bf16",
                                                       "wq_ptr": "*bf16", "head_count_ptr": "*i32"}, "bf16",
     dict(HEAD_DIM=64, BLOCK_N=64, BLOCK_D=64, PDL=True, SCALED=False, HAS_BIAS=True, BLOCK_C=128, GROUP=8,
          RBLOCK=1024, HAS_QKV_BIAS=True, NORM_BLOCK=1024, QKV_ROWS=16, BLOCK_K=512, QKV_STAGES=3, PROJ_STAGES=3), 4),
    (decode_attention._attention_block_spread_kernel, {"w_ptr": "*i8", "wq_ptr": "*i8", "head_count_ptr": "*i32"},
     "int8", dict(HEAD_DIM=64, BLOCK_N=64, BLOCK_D=64, PDL=False, SCALED=True, HAS_BIAS=True, BLOCK_C=128, GROUP=8,
                  RBLOCK=1024, HAS_QKV_BIAS=True, NORM_BLOCK=2048, QKV_ROWS=32, BLOCK_K=256, QKV_STAGES=3,
                  PROJ_STAGES=3), 4),
    (decode_attention._decode_split_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16", "w_ptr": "*i8", "wq_ptr": "*i8",
                                             "row_count_ptr": "*i32"}, "int8",
     dict(HEAD_DIM=64, SPLIT_LEN=256, BLOCK_N=64, BLOCK_D=64, APPEND=True, SINGLE=True, PROJ=True, SCALED=True,
          HAS_BIAS=True, BLOCK_C=128, GROUP=8, RBLOCK=1024, QKV=True, HAS_QKV_BIAS=True, NORM_BLOCK=2048,
          BLOCK_K=64), 4),
    (decode_attention._decode_merge_kernel, {"w_ptr": "*i8"}, "int8",
     dict(HEAD_DIM=64, SPLIT_LEN=128, BLOCK_S=32, BLOCK_D=64, PROJ=True, SCALED=True, HAS_BIAS=True, BLOCK_C=128,
          GROUP=8, RBLOCK=1024, PROJ_STAGES=3), 4),
    (sampling._sample_kernel, {}, "fp32", dict(HAS_PENALTY=True, DO_SAMPLE=True, DO_TOP_K=True, DO_TOP_P=True,
                                               BLOCK=1024, N_PIVOTS=16, ADVANCE=True, MARK_SEEN=True), 8),
    (sampling._sample_kernel, {}, "fp32", dict(HAS_PENALTY=False, DO_SAMPLE=False, DO_TOP_K=False,
                                               DO_TOP_P=False, BLOCK=4096, N_PIVOTS=16), 8),
    (sampling._sample_chunk_kernel, SPLIT_SAMPLING, "fp32", dict(HAS_PENALTY=True, DO_SAMPLE=True, DO_TOP_K=True,
                                                                 CHUNK=2048, CAP=64, HELD_PIVOTS=8, PDL=True), 8),
    (sampling._sample_chunk_kernel, SPLIT_SAMPLING, "fp32", dict(HAS_PENALTY=False, DO_SAMPLE=False, DO_TOP_K=False,
                                                                 CHUNK=2048, CAP=1, HELD_PIVOTS=8), 8),
    # the merge inside the chunks' launch (ONE_LAUNCH, no candidates): greedy (generate()'s default), temperature
    (sampling._sample_chunk_kernel, SPLIT_SAMPLING, "fp32", dict(HAS_PENALTY=False, DO_SAMPLE=False, DO_TOP_K=False,
                                                                 CHUNK=2048, CAP=1, HELD_PIVOTS=8, PDL=True,
                                                                 MERGE=True, N_CHUNKS=32, BLOCK=4096, N_PIVOTS=16,
                                                                 ADVANCE=True), 8),
    (sampling._sample_chunk_kernel, SPLIT_SAMPLING, "fp32", dict(HAS_PENALTY=True, DO_SAMPLE=True, DO_TOP_K=False,
                                                                 CHUNK=2048, CAP=1, HELD_PIVOTS=8, MERGE=True,
                                                                 N_CHUNKS=32, BLOCK=1024, N_PIVOTS=16, ADVANCE=True,
                                                                 MARK_SEEN=True), 8),
    (sampling._sample_merge_kernel, SPLIT_SAMPLING, "fp32", dict(HAS_PENALTY=True, DO_SAMPLE=True, DO_TOP_K=True,
                                                                 DO_TOP_P=True, CANDIDATES=True, CHUNK=2048, CAP=64,
                                                                 N_CHUNKS=32, BLOCK=1024, N_PIVOTS=16,
                                                                 HELD_PIVOTS=8, ADVANCE=True, MARK_SEEN=True), 8),
    (sampling._sample_merge_kernel, SPLIT_SAMPLING, "fp32", dict(HAS_PENALTY=False, DO_SAMPLE=True, DO_TOP_K=False,
                                                                 DO_TOP_P=True, CANDIDATES=True, CHUNK=2048, CAP=64,
                                                                 N_CHUNKS=32, BLOCK=1024, N_PIVOTS=16,
                                                                 HELD_PIVOTS=8, PDL=True), 8),  # top-p alone
    (sampling._sample_merge_kernel, SPLIT_SAMPLING, "fp32", dict(HAS_PENALTY=False, DO_SAMPLE=True, DO_TOP_K=False,
                                                                 DO_TOP_P=False, CANDIDATES=False, CHUNK=2048, CAP=1,
                                                                 N_CHUNKS=32, BLOCK=1024, N_PIVOTS=16,
                                                                 HELD_PIVOTS=8), 8),
    (sampling._sample_merge_kernel, SPLIT_SAMPLING, "fp32", dict(HAS_PENALTY=False, DO_SAMPLE=False, DO_TOP_K=False,
                                                                 DO_TOP_P=False, CANDIDATES=False, CHUNK=2048, CAP=1,
                                                                 N_CHUNKS=32, BLOCK=4096, N_PIVOTS=16,
                                                                 HELD_PIVOTS=8, PDL=True), 8),
    (sampling._sample_merge_kernel, SPLIT_SAMPLING, "fp32", dict(HAS_PENALTY=False, DO_SAMPLE=True, DO_TOP_K=True,
                                                                 DO_TOP_P=False, CANDIDATES=True, CHUNK=2048, CAP=16,
                                                                 N_CHUNKS=32, BLOCK=1024, N_PIVOTS=16,
                                                                 HELD_PIVOTS=8), 8),
    (embedding._embedding_kernel, {"table_ptr": "*bf16", "ids_ptr": "*i64", "pos_ptr": "*i64"}, "bf16",
     dict(SCALED=False, HAS_POS=True, BLOCK_C=1024, PDL=True), 4),
    (embedding._embedding_kernel, {"table_ptr": "*i8", "ids_ptr": "*i64", "pos_ptr": "*i64"}, "int8",
     dict(SCALED=True, HAS_POS=True, BLOCK_C=2048), 8),
    (lstm._lstm_cell_kernel, {}, "fp32", dict(BLOCK=256, PDL=True), 2),
    (vae._reparameterize_kernel, {}, "fp32", dict(BLOCK_L=vae.BLOCK_L), 2),
    (vae._bernoulli_elbo_kernel, {}, "fp32", dict(BLOCK_D=vae.BLOCK_D, BLOCK_L=vae.BLOCK_L), 4),
    (vae._bernoulli_log_likelihood_kernel, {}, "fp32", dict(BLOCK_D=vae.BLOCK_D), 4),
    (decode_attention._write_kv_kernel, {"kc_ptr": "*{dtype}", "vc_ptr": "*{dtype}"}, "bf16",
     dict(HEAD_DIM=64, BLOCK_D=64, PDL=True), 1),
    (conv_transpose._conv_transpose_kernel, {"out_ptr": "*fp32"}, "fp32",
     dict(CONV, ACT=CONV_ACTS["relu"], PRECISION="bf16x6", BLOCK_N=64, BLOCK_K=32), 8),
    (conv_transpose._conv_transpose_kernel, {"out_ptr": "*fp32"}, "fp32",  # the RGB layer
     dict(CONV, ACT=CONV_ACTS["tanh"], PRECISION="tf32", BLOCK_N=16, BLOCK_K=32), 8),
    (conv2d._conv2d_kernel, {"out_ptr": "*fp32"}, "fp32",  # the seed discriminator's RGB layer, 3 -> 64
     dict(CONV, ACT=CONV_ACTS["leaky_relu"], PRECISION="bf16x6", FLAT_K=True, BLOCK_N=64, BLOCK_K=16), 8),
    (conv2d._conv2d_kernel, {"out_ptr": "*fp32"}, "fp32",  # 64 -> 128, 128 -> 256
     dict(CONV, ACT=CONV_ACTS["leaky_relu"], PRECISION="bf16x6", FLAT_K=False, BLOCK_N=64, BLOCK_K=32), 8),
    (conv2d._conv2d_kernel, {"out_ptr": "*fp32"}, "fp32",  # ... asked for in tf32
     dict(CONV, ACT=CONV_ACTS["leaky_relu"], PRECISION="tf32", FLAT_K=False, BLOCK_N=64, BLOCK_K=32), 8),
    (conv2d._conv2d_kernel, {"out_ptr": "*fp32"}, "fp32",  # 256 -> 1, sigmoid: one channel in a BLOCK_N of 16
     dict(CONV, ACT=CONV_ACTS["sigmoid"], PRECISION="bf16x6", FLAT_K=False, BLOCK_N=16, BLOCK_K=32), 8),
    # bf16 files: bf16 weights, inputs rounded in the kernel, bf16 activations handed on between layers
    (conv_transpose._conv_transpose_kernel, {"x_ptr": "*fp32", "w_ptr": "*bf16", "out_ptr": "*bf16"}, "bf16",
     dict(CONV, ACT=CONV_ACTS["relu"], PRECISION="bf16x6", BLOCK_N=64, BLOCK_K=32), 8),  # z in, fp32
    (conv_transpose._conv_transpose_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp32"}, "bf16",
     dict(CONV, ACT=CONV_ACTS["tanh"], PRECISION="bf16x6", BLOCK_N=16, BLOCK_K=32), 8),  # the RGB layer
    (conv2d._conv2d_kernel, {"x_ptr": "*fp32", "w_ptr": "*bf16", "out_ptr": "*bf16"}, "bf16",  # the RGB layer
     dict(CONV, ACT=CONV_ACTS["leaky_relu"], PRECISION="bf16x6", FLAT_K=True, BLOCK_N=64, BLOCK_K=16), 8),
    (conv2d._conv2d_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16"}, "bf16",
     dict(CONV, ACT=CONV_ACTS["leaky_relu"], PRECISION="bf16x6", FLAT_K=False, BLOCK_N=64, BLOCK_K=32), 8),
]


def signature(kernel, pointers: dict, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for p in kernel.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = {**FIXED_POINTERS, **pointers}.get(name, "*fp32").format(dtype=dtype)
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    missing = {n for n, t in sig.items() if t == "constexpr"} - set(constexprs)
    if missing:
        raise SystemExit(f"{kernel.__name__}: constexprs {sorted(missing)} not given")
    return sig


def aligned(kernel, name: str) -> bool:
    """Whether a GPT-2 launch passes this int argument as a multiple of 16 (C = 768 ... 1600, K, the MLP's H = 4C,
    the attention projection's N = C, the activation and weight row strides, the attention and KV-cache strides:
    multiples of the head size). Not: the vocabulary (50,257) and strides over it, sequence lengths, head and row
    counts, the transposed convolution's sizes, the int4 scales' row stride (one per 64 inputs: 12 at C = 768),
    the fused kernels' counters per row (groups + 1)."""
    if kernel is mlp._mlp_kernel and name == "H":  # elsewhere H counts heads or image rows
        return True
    if kernel in (decode_attention._decode_split_kernel, decode_attention._decode_merge_kernel) and name == "N":
        return True  # the fused output projection's width, C (elsewhere N may be the vocabulary)
    return name in ("C", "K") or (re.fullmatch(r"\w+_stride|(q|k|v|o|kc|vc|nk|nv)_s[bhst]{1,2}", name) is not None
                                   and name not in ("logits_stride", "seen_stride", "s_stride", "count_stride"))


def attributes(kernel) -> dict:
    return {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
            if not p.is_constexpr and (p.name.endswith("_ptr") or aligned(kernel, p.name))}


def load_widths(ptx: str) -> str:
    """The widths of the kernel's reads from global memory, widest first, register loads and asynchronous
    copies into shared memory (`cp`) counted apart: `16 B x 9, 4 B x 4, cp 16 B x 18`."""
    bits = {"8": 1, "16": 2, "32": 4, "64": 8}
    loads: dict[int, int] = {}
    for vec, kind in re.findall(r"ld\.global(?:\.[a-z]+\d*)*?(?:\.v(\d))?\.[bsuf](\d+)\b", ptx):
        width = int(vec or 1) * bits[kind]
        loads[width] = loads.get(width, 0) + 1
    copies: dict[int, int] = {}
    for size in re.findall(r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-f]+|\d+)", ptx):
        copies[int(size, 0)] = copies.get(int(size, 0), 0) + 1
    parts = [f"{w} B x {n}" for w, n in sorted(loads.items(), reverse=True)]
    parts += [f"cp {w} B x {n}" for w, n in sorted(copies.items(), reverse=True)]
    return ", ".join(parts) or "none"


def tensor_cores(ptx: str) -> str:
    """The kernel's tensor-core instructions in its PTX (Hopper's wgmma, or mma.sync), e.g. "wgmma x 6", or "no
    mma": an fp32 tl.dot in IEEE precision runs on the FMA pipes, and ptxas cannot say so."""
    found = [f"{name} x {n}" for name, n in (("wgmma", len(re.findall(r"\bwgmma\.mma_async\b", ptx))),
                                              ("mma.sync", len(re.findall(r"\bmma\.sync\b", ptx)))) if n]
    return ", ".join(found) or "no mma"


def resources(ptx: str, arch: int) -> str:
    """Registers per thread and spilled bytes, as ptxas -v reports them for the kernel's PTX (a spill in a hot
    loop costs a round trip to local memory)."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}",
                                 "-v", path, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return f"{regs.group(1) if regs else '?':>3s} regs, {spills.group(1) if spills else '?'} B spilled"


def compile_variant(variant, target, arch: int) -> str:
    """One VARIANTS entry compiled for `target`: its report line."""
    kernel, pointers, dtype, constexprs, num_warps = variant
    t0 = time.perf_counter()
    if "PDL" in kernel.arg_names:  # the decode-path kernels: without PDL unless the variant says
        constexprs = {"PDL": False, **constexprs}
    if "SPLIT_K" in kernel.arg_names:
        constexprs = {"SPLIT_K": 1, **constexprs}
    for flag, off in (("NORM", False), ("ACCUMULATE", False), ("NORM_BLOCK", 16), ("PREFETCH", False),
                      ("RELU", False), ("WIDEN_DOT", False)):
        if flag in kernel.arg_names:
            constexprs = {flag: off, **constexprs}
    for p in kernel.params:  # constexprs with defaults (features off unless the variant turns them on)
        if p.is_constexpr and p.has_default and p.name not in constexprs:
            constexprs = {**constexprs, p.name: p.default}
    src = ASTSource(kernel, signature(kernel, pointers, dtype, constexprs), constexprs=constexprs,
                    attrs=attributes(kernel))
    compiled = triton.compile(src, target=target, options=dict(num_warps=num_warps))
    ptx = compiled.asm["ptx"]
    return (f"{kernel.__name__:22s} {dtype:4s} -> sm_{arch}: {compiled.metadata.shared:6d} B shared, "
            f"{resources(ptx, arch)}, loads {load_widths(ptx)}, {tensor_cores(ptx)}, "
            f"{time.perf_counter() - t0:4.1f} s  {constexprs}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="variants compiled at once (threads: triton's compiler and ptxas run outside the GIL)")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # lines printed in VARIANTS' order
        for line in pool.map(lambda v: compile_variant(v, target, args.arch), VARIANTS):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
