"""int4 (KIVI) specifics: the residual window's boundary, in the layout and in the fused kernel.

The layout is a pure function of the length: length // 32 full key groups, length % 32 residual tokens
in full precision. Kernel checks are those of test_schemes.check_scheme (exact-kernel tolerance
over the dequantized cache, step bound vs the unquantized cache).
"""
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_schemes import DEVICE, check_scheme, needs_kernel, pack

import kvpass.testing as kt
from kvpass.testing import make_problem
from lowering.attention.decode.launcher import DecodeAttentionConfig, packed_config
from lowering.core.operands import KV_INT4, KVOperands, int4_fragments_serve
from lowering.core.packed import allocate
from lowering.formats.budgeted import per_token
from lowering.storage import SCHEMES
from lowering.storage.int4_codes import pack_nibbles, quantize_groups, unpack_nibbles
from lowering.storage.int4_rows import Int4Rows

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
G = SCHEMES["4"].group


@pytest.mark.parametrize("length", [1, G - 1, G, G + 1, 2 * G - 1, 2 * G, 3 * G + 5])
def test_layout_is_full_groups_plus_residual(length):
    layout = SCHEMES["4"].layout(2, 3, length, 64, 64, torch.bfloat16)
    quant, res = length // G * G, length % G
    assert layout["k"][0] == (2, 3, quant, 32) and layout["k_scale"][0] == (2, 3, quant // G, 64)
    assert layout["v_scale"][0] == (2, 3, quant) and layout["k_res"][0] == (2, 3, res, 64)
    assert layout["v"][0] == (2, 3, quant // 16, 32, 16)  # 16-token blocks of 32 bytes (64 channels)
    assert layout["k_res"][1] == torch.bfloat16  # the residual window is held in the model's dtype


def test_residual_tokens_are_stored_exactly_and_a_filled_group_is_quantized():
    k, v = torch.randn(1, 2, G + 3, 16), torch.randn(1, 2, G + 3, 16)
    state = pack(SCHEMES["4"], k[:, :, :G - 1], v[:, :, :G - 1])
    assert torch.equal(state["k_res"], k[:, :, :G - 1]) and state["k"].shape[2] == 0
    state = pack(SCHEMES["4"], k, v, chunks=[G - 1, 1, 3])  # the 32nd token fills the group
    assert state["k"].shape[2] == G and torch.equal(state["k_res"], k[:, :, G:])
    kd, _ = SCHEMES["4"].dequantize(state, G + 3, torch.float32)
    assert torch.equal(kd[:, :, G:], k[:, :, G:]) and not torch.equal(kd[:, :, :G], k[:, :, :G])


@pytest.mark.parametrize("dim", [1, 2, 3, 16, 33, 128])
def test_a_byte_holds_channel_j_and_channel_j_plus_half(dim):
    """The layout the kernel reads (int4_tiles): byte j = channel j | channel j + ceil(D / 2) << 4, 0 past D."""

    codes = torch.randint(0, 16, (2, 3, dim), dtype=torch.uint8, generator=torch.Generator().manual_seed(dim))
    packed = pack_nibbles(codes)
    half = (dim + 1) // 2
    assert packed.shape == (2, 3, half) and packed.dtype == torch.uint8
    high = torch.zeros_like(packed)
    high[..., :dim - half] = codes[..., half:]
    assert torch.equal(packed & 15, codes[..., :half]) and torch.equal(packed >> 4, high)
    assert torch.equal(unpack_nibbles(packed, dim), codes)


@pytest.mark.parametrize("chunks", [[2 * G], [G - 1, 1, G]])
def test_value_words_hold_the_key_pairs_of_the_mma_operand(chunks):
    """The value layout the kernel reads (int4_tiles._value_tile): 16-token blocks [quant / 16, ceil(D / 2), 16],
    int32 word q of a block's byte row holding tokens 2q, 2q + 8, 2q + 1, 2q + 9 in its bytes 0..3."""

    v = torch.randn(1, 2, 2 * G, 24, generator=torch.Generator().manual_seed(7))
    state = pack(SCHEMES["4"], torch.randn(1, 2, 2 * G, 24), v, chunks=chunks)
    codes = pack_nibbles(quantize_groups(v, dim=3)[0])  # [1, 2, 2G, 12] bytes, token-major
    t = torch.arange(16)
    order = torch.stack([2 * (t[:4]), 2 * t[:4] + 8, 2 * t[:4] + 1, 2 * t[:4] + 9], 1).reshape(16)
    blocks = codes.reshape(1, 2, 2 * G // 16, 16, 12)[:, :, :, order].transpose(-1, -2)
    assert torch.equal(state["v"], blocks)


@needs_kernel
@pytest.mark.parametrize("length", [1, G - 1, G, G + 1, 2 * G - 1, 3 * G + 5])
@pytest.mark.parametrize("chunks", ["one append", "token by token"])
# The rule's one-group tiles, half-group tiles, and a config asking for 2 groups (the launcher caps it at one).
@pytest.mark.parametrize("block_n", [None, G // 2, 2 * G])
def test_kernel_across_the_residual_boundary(length, chunks, block_n):

    problem = make_problem(batch=2, q_heads=8, kv_heads=2, q_len=1, kv_len=length, head_dim=64, mask="bool",
                           left_pad=(0, length // 2), dtype=torch.float16, distribution="outlier_channels",
                           seed=length, device=DEVICE)
    config = None if block_n is None else DecodeAttentionConfig(block_n=block_n)
    check_scheme("4", problem, chunks=[1] * length if chunks == "token by token" else None, config=config)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(problem=kt.decode_problems(head_dims=(33, 64, 96, 128), dtypes=(torch.bfloat16, torch.float16),
                                  q_lens=st.integers(1, 3), kv_lens=st.integers(1, 3 * G + 7), causal=(False,),
                                  device=DEVICE),
       block_n=st.sampled_from((G // 2, G)))
def test_kernel_scoring_keys_by_the_folded_split(problem, block_n):
    """The split path (16-bit dtypes, D > 32, <= 8 query rows per KV head): keys scored by int8 MMAs of the query
    folded with each group's scales, against the float64 oracles over the exact keys with the scheme's score bound
    (check_scheme); GQA and speculative rows (1 to 8 fold rows), masks, residual windows, half-group tiles."""
    group = problem.q_heads // problem.kv_heads
    assume(SCHEMES["4"].splits_query(problem.dtype, problem.head_dim, group * problem.q_len))
    assume(not int4_fragments_serve(problem.dtype, problem.head_dim, group, problem.q_len))
    check_scheme("4", problem, config=DecodeAttentionConfig(block_n=block_n, num_warps=2))


def test_the_folded_split_is_taken_where_the_scheme_and_the_rule_offer_it():
    """The scheme offers it at 16-bit dtypes with D > 32 (int8 MMAs over a channel half) and <= 8 query rows per KV
    head (with more the fold costs more than the dequantization it saves); the launcher's int4 rule takes it in
    every regime (bench/RESULTS.md, session 11)."""

    scheme = SCHEMES["4"]
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    assert [scheme.splits_query(t, 128, 4) for t in dtypes] == [True, True, False]
    assert [scheme.splits_query(torch.bfloat16, d, 4) for d in (32, 33)] == [False, True]
    assert [scheme.splits_query(torch.bfloat16, 128, rows) for rows in (1, 8, 9)] == [True, True, False]
    kv = KVOperands(None, None, 1, KV_INT4, ())
    assert [packed_config(programs, 132, kv).split_query for programs in (8, 64, 256)] == [True, True, True]
    q = torch.zeros(1, 4, 1, 128, dtype=torch.float16)
    zeros = torch.zeros(1, 1, G, 128, dtype=torch.bfloat16)
    state = pack(scheme, zeros, zeros)
    assert scheme.kernel_operands(q, state, G).split_query
    assert not scheme.kernel_operands(q.float(), state, G).split_query
    # bf16 decode steps of D = 64 / 128 leave the split out for the fragment kernel (test_int4_fragments.py), others
    # keep it
    assert not scheme.kernel_operands(q.bfloat16(), state, G).split_query
    assert scheme.kernel_operands(torch.zeros(1, 4, 1, 96, dtype=torch.bfloat16),
                                  pack(scheme, zeros[..., :96], zeros[..., :96]), G).split_query
    assert not scheme.kernel_operands(torch.zeros(1, 4, 3, 128, dtype=torch.bfloat16), state, G).split_query


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 40), dim=st.sampled_from([2, 16, 64]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       kind=st.sampled_from(["normal", "outlier_channel", "zero_rows", "one_huge"]), seed=st.integers(0, 99))
def test_per_token_rows_round_trip_within_their_bound(length, dim, dtype, kind, seed):
    """int4 under a token policy (``int4_rows.py``): per-token rows, appended in two parts, give back every
    element within scale / 2 + roundings of the float64 input, and move with the kept tokens (per-token)."""

    scheme = Int4Rows()
    assert per_token(scheme)
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(2, 3, length, dim, generator=g) for _ in range(2))
    if kind == "outlier_channel":
        k[..., 0] *= 100
    elif kind == "zero_rows":
        v[:, :, ::2] = 0
    elif kind == "one_huge":
        k[0, 0, 0, 0] = 1e6
    k, v = k.to(dtype), v.to(dtype)
    _, state = allocate(scheme.layout(2, 3, length, dim, dim, dtype), "cpu")
    half = length // 2
    scheme.append(None, 0, k[:, :, :half], v[:, :, :half], {n: t[:, :, :half] for n, t in state.items()})
    scheme.append({n: t[:, :, :half] for n, t in state.items()}, half, k[:, :, half:], v[:, :, half:], state)
    k_hat, v_hat = scheme.dequantize(state, length, dtype)
    k_bound, v_bound = scheme.error_bound(state, length, dtype)
    assert not k_hat.isnan().any() and not v_hat.isnan().any()
    assert ((k.double() - k_hat.double()).abs() <= k_bound).all()
    assert ((v.double() - v_hat.double()).abs() <= v_bound).all()
