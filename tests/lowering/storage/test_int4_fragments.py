"""int4's fragment kernel (lowering/attention/decode/int4_fragments.py) and its twin.

With the scheme's ``fragment_kernel`` on (off by default until the kernel has passed on a GPU; these tests turn it
on), where ``int4_fragments_serve`` holds (bf16, D = 64 or 128, <= 8 query heads per KV head, Lq = 1) the scheme
scores keys without the query's split on every device: on CUDA the Gluon kernel serves (checked here by a spy on its
launcher), on the CPU the Triton kernel's unsplit path, its twin; both are checked by test_schemes.check_scheme
(exact-kernel tolerance over the dequantized cache, step bound vs the unquantized cache). The kernel's channel
order is checked on the host, and it compiles for sm_90 here (a subprocess: the tests run under the interpreter).
"""
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_schemes import DEVICE, check_scheme, needs_kernel, pack

import kvpass.testing as kt
from lowering.attention.decode import fragments
from lowering.core.operands import int4_fragments_serve
from lowering.storage import SCHEMES
from lowering.storage.int4 import Int4Kivi

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
G = SCHEMES["4"].group
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_reduction_order_is_a_permutation_whose_pairs_are_adjacent_channels(head_dim):
    """k = HALF hi + 16 w + 8 p + 2 t + e holds channel HALF hi + (HALF / 4) t + 4 w + 2 p + e: every channel once,
    each MMA pair (k even, k + 1) two adjacent channels (so a key group's scales load as pairs), and lane t's
    channels of one half the bytes (HALF / 4) t .. (HALF / 4)(t + 1) - 1 of the row (one vector load)."""
    if fragments.int4_fragments is None:
        pytest.skip("this Triton has no Gluon")
    half = head_dim // 2
    channel = [fragments.int4_fragments.key_channel(k, half) for k in range(head_dim)]
    assert sorted(channel) == list(range(head_dim))
    assert all(channel[k + 1] == channel[k] + 1 for k in range(0, head_dim, 2))
    for t in range(4):
        lane = [channel[k] % half for k in range(head_dim) if (k // 2) % 4 == t]
        assert sorted(set(lane)) == list(range(half // 4 * t, half // 4 * (t + 1)))


@pytest.fixture
def fragment_kernel_on():
    with mock.patch.object(Int4Kivi, "fragment_kernel", True):
        yield


def test_the_fragment_kernel_is_off_by_default():
    q = torch.zeros(1, 8, 1, 128, dtype=torch.bfloat16)
    zeros = torch.zeros(1, 2, G, 128, dtype=torch.bfloat16)
    operands = SCHEMES["4"].kernel_operands(q, pack(SCHEMES["4"], zeros, zeros), G)
    assert not operands.fragments and operands.split_query


def test_the_split_is_left_out_exactly_where_the_fragment_kernel_serves(fragment_kernel_on):
    scheme = SCHEMES["4"]
    zeros = torch.zeros(1, 2, G, 128, dtype=torch.bfloat16)
    state = pack(scheme, zeros, zeros)
    cases = [(torch.bfloat16, 8, 1), (torch.bfloat16, 16, 1), (torch.bfloat16, 18, 1), (torch.bfloat16, 8, 2),
             (torch.float16, 8, 1)]
    for dtype, heads, q_len in cases:
        q = torch.zeros(1, heads, q_len, 128, dtype=dtype)
        serves = int4_fragments_serve(dtype, 128, heads // 2, q_len)
        assert serves == (dtype == torch.bfloat16 and heads <= 16 and q_len == 1)
        operands = scheme.kernel_operands(q, state, G)
        assert operands.fragments == serves
        assert operands.split_query == (not serves and scheme.splits_query(dtype, 128, heads // 2 * q_len))
    assert not int4_fragments_serve(torch.bfloat16, 96, 4, 1) and int4_fragments_serve(torch.bfloat16, 64, 4, 1)


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(problem=kt.decode_problems(head_dims=(64, 128), dtypes=(torch.bfloat16,), gqa_ratios=(1, 2, 4, 8),
                                  q_lens=(1,), kv_lens=st.integers(1, 4 * G + 9), causal=(False,), device=DEVICE),
       chunks=st.sampled_from(["one append", "two appends"]))
def test_fragment_kernel_against_the_oracles(problem, chunks):
    """Shapes the fragment kernel serves: GQA 1..8, lengths from 1 across residual windows and key groups, no mask,
    per-key and per-head masks (the latter go to the Triton kernel), left padding, adversarial data. On CUDA the
    fragment kernel must have served every launch whose mask it takes."""
    served = []

    def spy(*args, **kwargs):
        served.append(real_launch(*args, **kwargs))
        return served[-1]

    real_launch = fragments.launch
    split = [problem.kv_len // 2, problem.kv_len - problem.kv_len // 2] if chunks == "two appends" else None
    with mock.patch.object(fragments, "launch", spy), mock.patch.object(Int4Kivi, "fragment_kernel", True):
        check_scheme("4", problem, chunks=[c for c in split if c] if split else None)
    mask = problem.attn_mask
    per_key = mask is None or (mask.shape[1] == 1 and mask.shape[2] == 1)
    if problem.q.is_cuda and per_key:
        assert served and all(out is not None for out in served), "the fragment kernel did not serve"


@needs_kernel
@pytest.mark.parametrize("length", [G * 40 + 7, G * 257])
def test_fragment_kernel_over_many_splits(length, fragment_kernel_on):
    """Long caches: many splits merged by stage 2, the residual window in the last split."""
    problem = kt.make_problem(batch=2, q_heads=16, kv_heads=2, q_len=1, kv_len=length, head_dim=128, mask="none",
                              dtype=torch.bfloat16, distribution="outlier_channels", seed=length, device=DEVICE)
    check_scheme("4", problem)


COMPILE = """
import sys
sys.path.insert(0, {root!r})
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from lowering.attention.decode import int4_fragments as frag
kernel = frag.int4_decode_kernel
for head_dim, mask_kind, mask_ptr, split in [(128, 2, "*bf16", True), (128, 0, "*bf16", False), (64, 1, "*u8", True)]:
    pointers = dict(Q="*bf16", K="*u8", V="*u8", Mask=mask_ptr, Out="*bf16", Part="*fp32", KS="*bf16", VS="*bf16",
                    KZ="*bf16", VZ="*bf16", KR="*bf16", VR="*bf16")
    constants = dict(GROUP=4, HEAD_DIM=head_dim, MASK_KIND=mask_kind, SPLIT_OUTPUT=split, **frag.constants(head_dim))
    signature = {{a: pointers.get(a, "constexpr" if a in constants else "fp32" if a == "sm_scale" else "i32")
                 for a in kernel.arg_names}}
    attrs = {{(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in pointers}}
    compiled = triton.compile(GluonASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=1))
    assert "HMMA" in compiled.asm["ptx"] or "mma.sync" in compiled.asm["ptx"], "no MMA"
    assert compiled.metadata.shared == 0, "a tile went through shared memory"
    print(head_dim, mask_kind, split, len(compiled.asm["cubin"]))
"""


@pytest.mark.skipif(fragments.int4_fragments is None, reason="this Triton has no Gluon")
@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU's check: on a GPU the kernel runs")
def test_fragment_kernel_compiles_for_hopper_without_shared_memory():
    """Every operand layout conversion is a register renaming (the kernel asserts it), for D = 64 and 128, every mask
    kind, with and without split partials; nothing is staged in shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE.format(root=ROOT)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.splitlines()) == 3
