"""int4's fragment kernel (lowering/attention/decode/int4_fragments.py) and its twin.

With the scheme's ``fragment_kernel`` on (the default), where ``int4_fragments_serve`` holds (bf16, D = 64 or 128, <=
8 query heads per KV head, Lq = 1) the scheme scores keys without the query's split on every device: on CUDA the Gluon
kernel serves (checked here by a spy on its launcher), on the CPU the Triton kernel's unsplit path, its twin; both are
checked by test_schemes.check_scheme (exact-kernel tolerance over the dequantized cache, step bound vs the unquantized
cache). The kernel's channel order is checked on the host, and it compiles for sm_90 here (a subprocess: the tests run
under the interpreter).
"""
import dataclasses
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_schemes import DEVICE, check_scheme, needs_kernel, pack

import kvpass.testing as kt
from lowering.attention.decode import fragments, launcher
from lowering.core.operands import int4_fragments_serve
from lowering.storage import SCHEMES
from lowering.storage.int4 import Int4Kivi
from lowering.storage.int4_codes import pack_nibbles

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


def test_the_fragment_kernel_is_on_by_default_and_can_be_turned_off():
    q = torch.zeros(1, 8, 1, 128, dtype=torch.bfloat16)
    zeros = torch.zeros(1, 2, G, 128, dtype=torch.bfloat16)
    operands = SCHEMES["4"].kernel_operands(q, pack(SCHEMES["4"], zeros, zeros), G)
    assert operands.fragments and not operands.split_query
    with mock.patch.object(Int4Kivi, "fragment_kernel", False):
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
       chunks=st.sampled_from(["one append", "two appends"]), prefetch=st.booleans(),
       registers=st.sampled_from([None, 168]))
# one query head over one KV head: the [B, 1, 1, L] mask's head dim has size 1, not stride 0, and is per key still
@example(problem=kt.make_problem(batch=1, q_heads=1, kv_heads=1, q_len=1, kv_len=1, head_dim=64,
                                 dtype=torch.bfloat16, mask="bool", device=DEVICE), chunks="one append", prefetch=False,
         registers=None)
def test_fragment_kernel_against_the_oracles(problem, chunks, prefetch, registers):
    """Shapes the fragment kernel serves: GQA 1..8, lengths from 1 across residual windows and key groups, no mask,
    per-key and per-head masks (the latter go to the Triton kernel), left padding, adversarial data, with and
    without the kernel's PREFETCH (``FRAGMENT_CONFIG.num_stages`` 2), with the compiler's registers or capped at
    168 (``FRAGMENT_CONFIG.max_registers``). On CUDA the fragment kernel must have served every launch whose mask it
    takes."""
    served = []

    def spy(*args, **kwargs):
        served.append(real_launch(*args, **kwargs))
        return served[-1]

    real_launch = fragments.launch
    split = [problem.kv_len // 2, problem.kv_len - problem.kv_len // 2] if chunks == "two appends" else None
    rule = dataclasses.replace(launcher.FRAGMENT_CONFIG, num_stages=2 if prefetch else 1, max_registers=registers)
    with (mock.patch.object(fragments, "launch", spy), mock.patch.object(Int4Kivi, "fragment_kernel", True),
          mock.patch.object(launcher, "FRAGMENT_CONFIG", rule)):
        check_scheme("4", problem, chunks=[c for c in split if c] if split else None)
    mask = problem.attn_mask
    per_key = mask is None or (mask.shape[1] == 1 and mask.shape[2] == 1)
    if problem.q.is_cuda and per_key:
        assert served and all(out is not None for out in served), "the fragment kernel did not serve"


@needs_kernel
@pytest.mark.parametrize("prefetch", [False, True])
# G * 257 keys: 64 splits at batch 2 on an H100. On the CPU only the Triton twin runs, and it took 77 s under the
# interpreter; G * 40 + 7 keys take 9 splits there (grid.CPU_SM_COUNT).
@pytest.mark.parametrize("length", [G * 40 + 7] + ([G * 257] if DEVICE == "cuda" else []))
def test_fragment_kernel_over_many_splits(length, prefetch, fragment_kernel_on):
    """Long caches: many splits merged by stage 2, the residual window in the last split."""
    if prefetch and DEVICE != "cuda":
        pytest.skip("PREFETCH is the GPU kernel's: the CPU's twin would run the same test twice")
    problem = kt.make_problem(batch=2, q_heads=16, kv_heads=2, q_len=1, kv_len=length, head_dim=128, mask="none",
                              dtype=torch.bfloat16, distribution="outlier_channels", seed=length, device=DEVICE)
    rule = dataclasses.replace(launcher.FRAGMENT_CONFIG, num_stages=2 if prefetch else 1)
    with mock.patch.object(launcher, "FRAGMENT_CONFIG", rule):
        check_scheme("4", problem)


COMPILE = """
import sys
sys.path.insert(0, {root!r})
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from lowering.attention.decode import int4_fragments as frag
kernel = frag.int4_decode_kernel
for head_dim, mask_kind, mask_ptr, split, prefetch, registers in [
        (128, 2, "*bf16", True, False, None), (128, 0, "*bf16", False, True, None), (64, 1, "*u8", True, True, None),
        (128, 2, "*bf16", True, True, 168)]:
    pointers = dict(Q="*bf16", K="*u8", V="*u8", Mask=mask_ptr, Out="*bf16", Part="*fp32", KS="*bf16", VS="*bf16",
                    KZ="*bf16", VZ="*bf16", KR="*bf16", VR="*bf16")
    constants = dict(GROUP=4, HEAD_DIM=head_dim, MASK_KIND=mask_kind, SPLIT_OUTPUT=split, PREFETCH=prefetch,
                     **frag.constants(head_dim))
    signature = {{a: pointers.get(a, "constexpr" if a in constants else "fp32" if a == "sm_scale" else "i32")
                 for a in kernel.arg_names}}
    attrs = {{(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in pointers}}
    options = dict(num_warps=1) if registers is None else dict(num_warps=1, maxnreg=registers)
    compiled = triton.compile(GluonASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    assert "HMMA" in compiled.asm["ptx"] or "mma.sync" in compiled.asm["ptx"], "no MMA"
    assert compiled.metadata.shared == 0, "a tile went through shared memory"
    print(head_dim, mask_kind, split, len(compiled.asm["cubin"]))
"""


@pytest.mark.skipif(fragments.int4_fragments is None, reason="this Triton has no Gluon")
@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU's check: on a GPU the kernel runs")
def test_fragment_kernel_compiles_for_hopper_without_shared_memory():
    """Every operand layout conversion is a register renaming (the kernel asserts it), for D = 64 and 128, every mask
    kind, with and without split partials and PREFETCH, and with registers capped at 168 (ptxas's maxnreg); nothing
    is staged in shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE.format(root=ROOT)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.splitlines()) == 4


def _pairs(words: torch.Tensor) -> torch.Tensor:
    """The kernel's ``_pairs`` on int32 words: [..., p, hi] words of two bf16 patterns 128 + c."""
    lo0, lo8 = (words & 0x000F000F) | 0x43004300, ((words >> 8) & 0x000F000F) | 0x43004300
    hi0, hi8 = ((words >> 4) & 0x000F000F) | 0x43004300, ((words >> 12) & 0x000F000F) | 0x43004300
    return torch.stack([torch.stack([lo0, lo8], -1), torch.stack([hi0, hi8], -1)], -1)


def _halves(pairs: torch.Tensor) -> torch.Tensor:
    """The kernel's ``_bf16_halves`` + join: [..., 2] codes (the patterns' low and high 16 bits, minus 128)."""
    return torch.stack([(pairs & 0xFFFF) - 0x4300, ((pairs >> 16) & 0xFFFF) - 0x4300], -1)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_kernels_index_program_reads_each_code_where_its_operand_wants_it(head_dim):
    """The fragment kernel's tensor program (word offsets, byte swap, nibble pairs, joins, permutes, splits and
    reshapes, replayed here in torch with the same semantics) gives the key operand K^T[k, n] = the code of channel
    ``key_channel(k)`` of key n, and the value operand V^T[m, n] = the code of channel m (then HALF + m) of key n,
    from the words as the scheme stores them."""
    if fragments.int4_fragments is None:
        pytest.skip("this Triton has no Gluon")
    half, tile = head_dim // 2, 32
    gen = torch.Generator().manual_seed(head_dim)
    kc = torch.randint(0, 16, (1, 1, tile, head_dim), dtype=torch.uint8, generator=gen)
    vc = torch.randint(0, 16, (1, 1, tile, head_dim), dtype=torch.uint8, generator=gen)
    k_words = pack_nibbles(kc)[0, 0].contiguous().view(torch.int32).reshape(-1).long()  # [key, HALF / 4] words
    v_bytes = torch.zeros(tile // 16, half, 16, dtype=torch.uint8)
    token_rows = pack_nibbles(vc)[0, 0]  # [key, HALF]
    slots = torch.tensor(SCHEMES["4"].VALUE_SLOTS)
    for n in range(tile):
        v_bytes[n // 16, :, slots[n % 16]] = token_rows[n]
    v_words = v_bytes.contiguous().view(torch.int32).reshape(-1).long()

    # keys: words [n, t, w] at n HALF / 4 + t HALF / 16 + w; swap bytes 1, 2; pairs [n, t, w, p, hi]
    n, t, w = torch.arange(tile), torch.arange(4), torch.arange(half // 16)
    words = k_words[n[:, None, None] * (half // 4) + t[None, :, None] * (half // 16) + w[None, None, :]]
    b = [(words >> (8 * i)) & 0xFF for i in range(4)]
    words = b[0] | (b[2] << 8) | (b[1] << 16) | (b[3] << 24)
    k_lo, k_hi = _pairs(words).permute(2, 3, 1, 0, 4).unbind(-1)  # [w, p, t, n] each
    for part, pairs in ((0, k_lo), (1, k_hi)):
        codes = _halves(pairs.reshape(half // 2, tile)).permute(0, 2, 1).reshape(half, tile)  # _split_rows
        channel = [fragments.int4_fragments.key_channel(k + part * half, half) for k in range(half)]
        assert torch.equal(codes, kc[0, 0, :, channel].T.long()), f"key half {part}"

    # values: words [blk, mt, r, g, t] at blk HALF 4 + (16 mt + 8 r + g) 4 + t; pairs -> [mt, r, g, blk, p, t] x hi
    blk, mt, r, g = torch.arange(2), torch.arange(half // 16), torch.arange(2), torch.arange(8)
    c = mt[:, None, None] * 16 + r[None, :, None] * 8 + g[None, None, :]
    off = (blk[:, None, None, None] * half * 4 + c[None] * 4)[..., None] + t
    v_lo, v_hi = _pairs(v_words[off]).permute(1, 2, 3, 0, 5, 4, 6).unbind(-1)
    for part, pairs in ((0, v_lo), (1, v_hi)):
        codes = _halves(pairs.reshape(half, 16)).reshape(half, tile)  # _split_cols
        assert torch.equal(codes, vc[0, 0, :, part * half:(part + 1) * half].T.long()), f"value half {part}"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_kernels_group_rows_follow_the_key_operands_order(head_dim):
    """``_group_halves``'s program: a group's scales loaded at HALF hi + (HALF / 4) t + 4 w + j, then [hi, w, t, p, e]
    -> [w, p, t, e] per half: entry k of half ``hi`` is the scale of ``key_channel(HALF hi + k)``."""
    if fragments.int4_fragments is None:
        pytest.skip("this Triton has no Gluon")
    half = head_dim // 2
    row = torch.randperm(head_dim, generator=torch.Generator().manual_seed(1))
    hi, w, t, j = torch.arange(2), torch.arange(half // 16), torch.arange(4), torch.arange(4)
    base = hi[:, None, None] * half + w[None, :, None] * 4 + t[None, None, :] * (half // 4)
    x = row[base[..., None] + j].reshape(2, half // 16, 4, 2, 2).permute(1, 3, 2, 4, 0)
    for part, vector in enumerate(x.unbind(-1)):
        expected = row[[fragments.int4_fragments.key_channel(part * half + k, half) for k in range(half)]]
        assert torch.equal(vector.reshape(half), expected)
