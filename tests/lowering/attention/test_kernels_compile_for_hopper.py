"""The Triton kernels compile for sm_90 (H100 / H200) here, without a GPU.

The interpreter accepts code the compiler refuses (session 8: a constexpr reassigned in a ``static_range``
loop ran on the CPU and failed every int8 launch on the H200), so every kernel of the rotated int8 path is
compiled to a cubin (both ways of rotating the query; the split query and token-blocked values of
int8, and the converted-codes path they replace) with the Triton of this machine, in a subprocess: the tests'
process has TRITON_INTERPRET=1, under which the kernels are interpreter objects the compiler cannot take.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# int4's pointers and constexprs over the split kernel's (below): codes as bytes, scales in the model's dtype.
INT4_POINTERS = {"K": "*u8", "V": "*u8", "KS": "*bf16", "VS": "*bf16", "Mask": "*bf16"}
INT4_FP16_POINTERS = {**INT4_POINTERS, "Q": "*fp16", "Out": "*fp16", "KS": "*fp16", "VS": "*fp16", "KZ": "*fp16",
                      "VZ": "*fp16", "KR": "*fp16", "VR": "*fp16", "Mask": "*fp16"}
INT4_CONSTANTS = dict(KV_FORMAT=2, BLOCK_N=32, MASK_KIND=2, ROTATE_STAGES=0, ROTATE_SHIFT=0, SPLIT_QUERY=True,
                      FOLD_ROWS=4, VALUE_BLOCK=16, SPLIT_OUTPUT=True)  # keys by the folded query's int8 split
INT4_APPEND_POINTERS = {"Positions": "*i64", "NewK": "*bf16", "NewV": "*bf16", "KCodes": "*u8", "KScale": "*bf16",
                        "KMin": "*bf16", "VCodes": "*u8", "VScale": "*bf16", "VMin": "*bf16", "KRes": "*bf16",
                        "VRes": "*bf16", "SLOTS": "*i64"}
# (kernel, pointer types, constexprs): the launches int8 makes at D=128 bf16, int4's, and the merge. The split
# kernel's cases give only what differs from SPLIT_POINTERS / SPLIT_CONSTANTS.
CASES = {
    "quantize rows, rotated": (
        "lowering.attention.append.kernel:quantize_rows_append_kernel",
        {"X": "*bf16", "Codes": "*i8", "Scales": "*fp32"},
        dict(QMAX=127.0, HEAD_DIM=128, BLOCK_D=128, ROTATE_STAGES=7, ROTATE_SHIFT=3, ROW_BLOCK=0,
             START_IN_MEMORY=False, FP8=False)),
    "decode split, rotated, one split": (
        "lowering.attention.decode.kernel:decode_attention_split_kernel", None,
        dict(SPLIT_OUTPUT=False)),
    "decode split, rotated, partials": (
        "lowering.attention.decode.kernel:decode_attention_split_kernel", None,
        dict(SPLIT_OUTPUT=True)),
    "decode split, query rotated by an MMA": (
        "lowering.attention.decode.kernel:decode_attention_split_kernel", None,
        dict(SPLIT_OUTPUT=True, ROTATE_QUERY_BY_MMA=True)),
    "decode split, unrotated, converted keys, row-major values": (
        "lowering.attention.decode.kernel:decode_attention_split_kernel", None,
        dict(SPLIT_OUTPUT=True, ROTATE_STAGES=0, ROTATE_SHIFT=0, SPLIT_QUERY=False, VALUE_BLOCK=0)),
    "decode split, head dim 16 (no split query), masked": (
        "lowering.attention.decode.kernel:decode_attention_split_kernel", None,
        dict(SPLIT_OUTPUT=True, HEAD_DIM=16, BLOCK_D=16, ROTATE_STAGES=4, ROTATE_SHIFT=2, SPLIT_QUERY=False)),
    "decode split, fp8, fp16 MMAs, token-blocked values": (
        "lowering.attention.decode.kernel:decode_attention_split_kernel", {"K": "*fp8e4nv", "V": "*fp8e4nv"},
        dict(SPLIT_OUTPUT=True, ROTATE_STAGES=0, ROTATE_SHIFT=0, SPLIT_QUERY=False, F16_CODES=True)),
    # int4 (KIVI): one-group tiles of the launcher's rule, HF's per-key additive mask, bf16 and fp16 (dequantized
    # value tiles); keys by the folded query's split (GQA 4: 4 fold rows), and dequantized (the path of fp32, of
    # D <= 32 and of more than 8 query rows per KV head).
    "decode split, int4, bf16": (
        "lowering.attention.decode.kernel:decode_attention_split_kernel", INT4_POINTERS, INT4_CONSTANTS),
    "decode split, int4, bf16, dequantized keys": (
        "lowering.attention.decode.kernel:decode_attention_split_kernel", INT4_POINTERS,
        {**INT4_CONSTANTS, "SPLIT_QUERY": False}),
    "decode split, int4, fp16, odd head dim, one split": (
        "lowering.attention.decode.kernel:decode_attention_split_kernel", INT4_FP16_POINTERS,
        {**INT4_CONSTANTS, "HEAD_DIM": 33, "BLOCK_D": 64, "FOLD_V_SCALE": False, "SPLIT_OUTPUT": False}),
    "quantize rows into token blocks": (
        "lowering.attention.append.kernel:quantize_rows_append_kernel",
        {"X": "*bf16", "Codes": "*i8", "Scales": "*fp32"},
        dict(QMAX=127.0, HEAD_DIM=128, BLOCK_D=128, ROTATE_STAGES=7, ROTATE_SHIFT=3, ROW_BLOCK=16,
             START_IN_MEMORY=False, FP8=False)),
    "quantize rows, fp8 e4m3, at a device position": (
        "lowering.attention.append.kernel:quantize_rows_append_kernel",
        {"X": "*bf16", "Codes": "*i8", "Scales": "*fp32", "start": "*i64"},
        dict(QMAX=448.0, HEAD_DIM=128, BLOCK_D=128, ROTATE_STAGES=0, ROTATE_SHIFT=0, ROW_BLOCK=0,
             START_IN_MEMORY=True, FP8=True)),
    "quantize rows into token blocks at a device position": (
        "lowering.attention.append.kernel:quantize_rows_append_kernel",
        {"X": "*bf16", "Codes": "*i8", "Scales": "*fp32", "start": "*i64"},
        dict(QMAX=127.0, HEAD_DIM=128, BLOCK_D=128, ROTATE_STAGES=7, ROTATE_SHIFT=3, ROW_BLOCK=16,
             START_IN_MEMORY=True, FP8=False)),
    "quantize rows into token blocks, fp8 e4m3, at a device position": (
        "lowering.attention.append.kernel:quantize_rows_append_kernel",
        {"X": "*bf16", "Codes": "*i8", "Scales": "*fp32", "start": "*i64"},
        dict(QMAX=448.0, HEAD_DIM=128, BLOCK_D=128, ROTATE_STAGES=0, ROTATE_SHIFT=0, ROW_BLOCK=16,
             START_IN_MEMORY=True, FP8=True)),
    # one decode token into an int4 cache of fixed capacity (constexpr dtypes as "tl.<name>")
    "int4 decode append, bf16": (
        "lowering.attention.append.int4_kernel:int4_decode_append_kernel", dict(INT4_APPEND_POINTERS),
        dict(HEAD_DIM=128, HALF=64, BLOCK_H=64, GROUP=32, TOKENS=16, DTYPE="tl.bfloat16", BITS="tl.uint16")),
    "int4 decode append, fp16, odd head dim": (
        "lowering.attention.append.int4_kernel:int4_decode_append_kernel",
        {k: v.replace("bf16", "fp16") for k, v in INT4_APPEND_POINTERS.items()},
        dict(HEAD_DIM=33, HALF=17, BLOCK_H=32, GROUP=32, TOKENS=16, DTYPE="tl.float16", BITS="tl.uint16")),
    "int4 decode append, fp32": (
        "lowering.attention.append.int4_kernel:int4_decode_append_kernel",
        {k: v.replace("bf16", "fp32") for k, v in INT4_APPEND_POINTERS.items()},
        dict(HEAD_DIM=64, HALF=32, BLOCK_H=32, GROUP=32, TOKENS=16, DTYPE="tl.float32", BITS="tl.uint32")),
    # int4's decode mask over a fixed capacity: a bool mask (as bytes) and an additive bf16 one
    "group mask, bool": (
        "lowering.attention.decode.group_mask:group_mask_kernel", {"Mask": "*u8", "Out": "*u8", "Last": "*i64"},
        dict(GROUP=32, BLOCK=1024)),
    "group mask, additive bf16": (
        "lowering.attention.decode.group_mask:group_mask_kernel",
        {"Mask": "*bf16", "Out": "*bf16", "Last": "*i64", "masked": "fp32"}, dict(GROUP=32, BLOCK=1024)),
    "merge, rotated": (
        "lowering.attention.device.merge:merge_splits_kernel", {"Part": "*fp32", "Out": "*bf16"},
        dict(HEAD_DIM=128, BLOCK_D=128, SPLIT_BLOCK=16, ROTATE_STAGES=7, ROTATE_SHIFT=4)),
}
SPLIT_POINTERS = {"Q": "*bf16", "K": "*i8", "V": "*i8", "Mask": "*u8", "Out": "*bf16", "Part": "*fp32",
                  "KS": "*fp32", "VS": "*fp32", "KZ": "*bf16", "VZ": "*bf16", "KR": "*bf16", "VR": "*bf16",
                  "Stats": "*i64"}
# int8's path: the split query, token-blocked values
SPLIT_CONSTANTS = dict(GROUP=4, HEAD_DIM=128, BLOCK_M=16, BLOCK_N=256, BLOCK_D=128, MASK_KIND=1, MASK_PER_KEY=True,
                       IS_CAUSAL=False, SKIP_MASKED_KEYS=True, DOT_PRECISION="tf32", UPCAST_DOT=False, KV_FORMAT=1,
                       QUANT_GROUP=32, FOLD_V_SCALE=True, ROTATE_STAGES=7, ROTATE_SHIFT=4, ROTATE_QUERY_BY_MMA=False,
                       SPLIT_QUERY=True, VALUE_BLOCK=16, F16_CODES=False)
FLOAT_ARGS = {"sm_scale", "skip_error", "value_bound", "half_tau"}


def compile_kernel(name: str, pointers=None, constants=None, options=None, divisible=()):
    """Compile one case for sm_90 (``pointers`` / ``constants`` / ``options``: overrides; ``divisible``: arguments
    the compiler may take as multiples of 16, as Triton's launcher specializes them: bench/kernel_sass.py);
    returns Triton's compiled kernel."""
    import importlib

    import triton
    import triton.language  # noqa: F401  (constexpr dtypes)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    path, case_pointers, case_constants = CASES[name]
    module, attr = path.split(":")
    kernel = getattr(importlib.import_module(module), attr)
    launch_options = dict(num_warps=4, num_stages=3)
    case_pointers, case_constants = case_pointers or {}, case_constants
    if attr == "decode_attention_split_kernel":
        case_pointers, case_constants = {**SPLIT_POINTERS, **case_pointers}, {**SPLIT_CONSTANTS, **case_constants}
        if case_constants["KV_FORMAT"] == 2:  # the launcher's int4 options
            launch_options = dict(num_warps=2, num_stages=3)
    pointers = {**case_pointers, **(pointers or {})}
    constants = {**case_constants, **(constants or {})}
    constants = {k: getattr(triton.language, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
                 for k, v in constants.items()}
    signature = {arg: pointers.get(arg, "constexpr" if arg in constants else "fp32" if arg in FLOAT_ARGS else "i32")
                 for arg in kernel.arg_names}
    attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in divisible}
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                          options={**launch_options, **(options or {})})


def compile_case(name: str) -> int:
    """Compile one case for sm_90; returns the cubin's size in bytes."""
    return len(compile_kernel(name).asm["cubin"])


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_compiles_for_sm90(name):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))  # the checkout
    result = subprocess.run([sys.executable, __file__, name], env=env, capture_output=True, text=True, timeout=300,
                            cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip().splitlines()[-1]) > 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    print(compile_case(sys.argv[1]))
