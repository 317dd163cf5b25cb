"""sm_90 SASS of one kernel case, without a GPU: total and main-loop instruction counts, opcode histogram.

The cases and their compilation are those of tests/lowering/attention/test_kernels_compile_for_hopper.py (imported, so
the counts describe what the test compiles). Run with the GPU image's Triton (3.6) in a process without
TRITON_INTERPRET, e.g.

    python -m venv --system-site-packages /tmp/t36
    /tmp/t36/bin/pip install -q triton==3.6.0
    /tmp/t36/bin/python bench/kernels/kernel_sass.py "decode split, int4, bf16"
    /tmp/t36/bin/python bench/kernels/kernel_sass.py "decode split, int4, bf16" --set SPLIT_QUERY=False \
        --dump /tmp/a.sass

The int4 fragment kernel (Gluon, ``lowering/attention/decode/int4_fragments.py``) is compiled the same way with
``--fragments D`` (its launch constants, bf16, GQA 4, per-key additive mask, split partials), e.g.

    /tmp/t36/bin/python bench/kernels/kernel_sass.py --fragments 128

The main loop is the longest range between a backward branch and its target (Triton's pipelined key loop;
everything inside it is unrolled; for the Gluon kernel only predicated backward branches count, the loop's latch:
its out-of-line blocks jump back into the loop unconditionally); its "hot path" leaves out the blocks warp-uniform
branches skip (int4's residual-window tile), so it is what a warp issues per key tile of codes; "steady" also leaves
out long blocks that branches inside convergence regions skip (int4's lazy rescale: check in --dump that they are
the rare path). The register line is cuobjdump's ``-res-usage``.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "lowering", "attention")]  # the hopper compile test
os.environ.pop("TRITON_INTERPRET", None)  # compiled for sm_90: the kernels below are defined for the GPU

import triton  # noqa: E402
from test_kernels_compile_for_hopper import CASES, compile_kernel  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from lowering.attention.decode import int4_fragments as frag  # noqa: E402

# "/*0a30*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;"
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
Instruction = tuple[int, str, str, str]  # address, predicate ("" or "@!P5 "), opcode, operands


def cuobjdump(cubin: bytes, flag: str) -> str:
    """The output of the cuobjdump that Triton bundles, with ``flag``, on a cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], check=True, capture_output=True, text=True).stdout


def sass(cubin: bytes) -> str:
    """cuobjdump -sass of a cubin."""
    return cuobjdump(cubin, "-sass")


def instructions(text: str) -> list[Instruction]:
    """Every instruction; NOPs (scheduling padding) dropped."""
    out = [(int(m[1], 16), m[2] or "", m[3], m[4]) for m in INSTRUCTION.finditer(text)]
    return [ins for ins in out if ins[2] != "NOP"]


def _branch_target(ins: Instruction) -> int | None:
    target = re.search(r"0x([0-9a-f]+)", ins[3]) if ins[2] == "BRA" else None
    return None if target is None else int(target[1], 16)


def main_loop(code: list[Instruction], latches_only: bool = False) -> list[Instruction]:
    """The instructions of the longest backward-branch range (target .. branch, inclusive); ``latches_only``: of
    predicated backward branches only."""
    best = []
    for i, ins in enumerate(code):
        target = _branch_target(ins)
        if target is not None and target <= ins[0] and (ins[1] or not latches_only):
            best = max(best, [x for x in code[:i + 1] if x[0] >= target], key=len)
    return best


def hot_path(loop: list[Instruction], min_divergent: int | None = None) -> list[Instruction]:
    """``loop`` without the blocks that predicated forward branches outside convergence regions (BSSY .. BSYNC)
    jump over: a warp-uniform ``if`` such as int4's residual-window tile, which runs for one tile of a split.
    Branches inside BSSY regions are taken per lane (a lane storing a reduction's result): the warp issues
    those blocks, unless ``min_divergent`` is given and the block has at least that many instructions (the
    compiler wraps a uniform branch it cannot prove uniform, e.g. int4's lazy rescale, in BSSY too)."""
    skipped, depth = [], 0
    for ins in loop:
        depth += (ins[2] == "BSSY") - (ins[2] == "BSYNC")
        target = _branch_target(ins)
        if ins[1] and target is not None and target > ins[0]:
            size = sum(ins[0] < x[0] < target for x in loop)
            if depth == 0 or (min_divergent is not None and size >= min_divergent):
                skipped.append((ins[0], target))
    return [x for x in loop if not any(a < x[0] < t for a, t in skipped)]


def histogram(code) -> collections.Counter:
    """Opcodes without their modifiers past the second (HMMA.16816.F32.BF16 -> HMMA.16816)."""
    return collections.Counter(".".join(ins[2].split(".")[:2]) for ins in code)


def launch_specialization(case: str, constants: dict) -> tuple[dict, list[str]]:
    """What Triton's launcher specializes at the issue's decode shape (B x Hq=32 x 1 x D=128 over Hkv=8, HF's
    [B, 1, 1, L] mask): integer arguments equal to 1 become constants (q_len, the mask's key stride), pointers
    and strides multiples of 16 get the divisibility that lets loads vectorize and pipeline as cp.async.
    Without it every code byte is a separate unpipelined LDG. Returns (constants, divisible arguments)."""
    path = CASES[case][0]
    module, attr = path.split(":")
    names = getattr(importlib.import_module(module), attr).arg_names
    ones = {"q_len": 1, "stride_mn": 1} if attr == "decode_attention_split_kernel" else {}
    ones = {k: v for k, v in ones.items() if k not in constants}
    divisible = [n for n in names if n not in constants and n not in ones
                 and (n[0].isupper() or (n.startswith("stride_") and n not in ("stride_mh", "stride_mm")))]
    return {**ones, **constants}, divisible


def compile_fragments(head_dim: int, options=None, overrides=None):
    """The int4 fragment kernel for sm_90 as its launcher specializes it: bf16, GQA 4, a per-key additive mask of
    key stride 1, split partials, pointers and strides multiples of 16 (``lowering/attention/decode/fragments.py``)."""
    kernel = frag.int4_decode_kernel
    pointers = dict(Q="*bf16", K="*u8", V="*u8", Mask="*bf16", Out="*bf16", Part="*fp32", KS="*bf16", VS="*bf16",
                    KZ="*bf16", VZ="*bf16", KR="*bf16", VR="*bf16")
    constants = dict(GROUP=4, HEAD_DIM=head_dim, MASK_KIND=2, SPLIT_OUTPUT=True, stride_mn=1, PREFETCH=False,
                     **frag.constants(head_dim))
    constants.update(overrides or {})
    signature = {a: pointers.get(a, "constexpr" if a in constants else "fp32" if a == "sm_scale" else "i32")
                 for a in kernel.arg_names}
    divisible = [a for a in kernel.arg_names if a in pointers or (a.startswith("stride_") and a not in constants)]
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    return triton.compile(GluonASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 1, **(options or {})})


def registers(cubin: bytes) -> str:
    """cuobjdump -res-usage's line for the kernel (registers, stack, shared)."""
    out = cuobjdump(cubin, "-res-usage")
    return next((line.strip() for line in out.splitlines() if "REG:" in line), "")


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", nargs="?", help="a key of the hopper test's CASES (none: list them)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a constexpr (BLOCK_N=64) or pointer type (K=*u8)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="override a compile option (num_warps=4)")
    parser.add_argument("--generic", action="store_true",
                        help="no launch specialization (the hopper test's compile: no alignment, no constant 1s)")
    parser.add_argument("--top", type=int, default=25, help="opcodes shown")
    parser.add_argument("--dump", help="write the SASS here")
    parser.add_argument("--fragments", type=int, metavar="D", help="the int4 fragment kernel at head dim D instead")
    args = parser.parse_args(argv)
    if args.fragments:
        options = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.option)}
        constants = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}  # PREFETCH=True
        compiled = compile_fragments(args.fragments, options, constants)
        args.case = f"int4 fragments, D={args.fragments}"
    elif args.case is None:
        print("\n".join(CASES))
        return
    else:
        pairs = [(k, parse_value(v)) for k, v in (s.split("=", 1) for s in args.set)]
        pointers = {k: v for k, v in pairs if isinstance(v, str) and v.startswith("*")}
        constants = {k: v for k, v in pairs if k not in pointers}
        options = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.option)}
        divisible = []
        if not args.generic:
            constants, divisible = launch_specialization(args.case, constants)
        compiled = compile_kernel(args.case, pointers, constants, options, divisible)
    text = sass(compiled.asm["cubin"])
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(text)
    code = instructions(text)
    loop = main_loop(code, latches_only=bool(args.fragments))
    hot = hot_path(loop)
    steady = hot_path(loop, min_divergent=16)
    print(f"{args.case} {constants or ''} {options or ''}")
    print(f"total {len(code)}  loop {len(loop)}  hot path {len(hot)} (loop without uniform skipped blocks)  "
          f"steady {len(steady)} (also without blocks of >= 16 in convergence regions)  "
          f"shared {compiled.metadata.shared} B; {registers(compiled.asm['cubin'])}")
    print("steady path opcodes:")
    for op, count in histogram(steady).most_common(args.top):
        print(f"  {count:5d}  {op}")


if __name__ == "__main__":
    main()
