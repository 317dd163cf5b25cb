"""The Triton split-KV decode kernel (lowering/attention/decode/) against the float64 reference.

Runs on the CPU under TRITON_INTERPRET=1 (conftest.py) or on CUDA (KVPASS_TEST_DEVICE / a visible
GPU). Problems, oracles and tolerances come from ``kvpass.testing``: the tolerance is the
per-element worst-case bound of a FlashAttention-style kernel (fp32 scores and accumulators,
probabilities rounded to the input dtype, one output rounding; derivation in
``kvpass.testing.tolerance.exact_tolerance``), doubled for bf16 under the interpreter, which
truncates instead of rounding. Every call writes into a NaN-poisoned ``out`` buffer.
"""
import functools
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvpass.testing as kt
from kvpass.testing import make_problem
from kvpass.testing.pytest_plugin import triton_interpreter_problem

DEVICE = kt.default_device()
if DEVICE == "cpu" and triton_interpreter_problem() == "TRITON_INTERPRET is not set":
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 on the CPU", allow_module_level=True)
pytest.importorskip("triton")

import lowering.attention.decode.launcher as launcher  # noqa: E402
from lowering.attention.decode.launcher import (  # noqa: E402
    RULE_CONFIGS,
    SMEM_FALLBACK,
    DecodeAttentionConfig,
    choose_num_splits,
    decode_attention,
    decode_attention_unsupported_reason,
    default_config,
    fit_shared_memory,
    grid_regime,
    shared_memory_bound,
)

pytestmark = [pytest.mark.requires_triton,
              # The interpreter evaluates both sides of tl.where: log(0) of empty rows, discarded.
              pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")]

# The head dims the contract promises (up to 256, padded in-kernel): the usual ones and odd ones.
HEAD_DIMS = (16, 33, 64, 80, 128)
# Small key blocks, so that the CI sizes (L <= 160) span many blocks and splits.
SPLIT_CONFIGS = {
    "one split": DecodeAttentionConfig(block_n=16, num_splits=1),
    "3 splits": DecodeAttentionConfig(block_n=16, num_splits=3),
    "a split per block": DecodeAttentionConfig(block_n=16, num_splits=65535, split_block=16),
    "32-key blocks, no key skipping": DecodeAttentionConfig(block_n=32, num_splits=2, skip_masked_keys=False),
}


def kernel(config=None):
    fn = functools.partial(decode_attention, config=config)
    fn.__name__ = f"decode_attention(config={config})"
    return fn


@given(problem=kt.decode_problems(head_dims=HEAD_DIMS, device=DEVICE))
@example(problem=make_problem(batch=1, q_heads=32, kv_heads=1, q_len=4, kv_len=70, head_dim=16,
                              device=DEVICE))  # MQA x 4 queries = 128 rows: two row blocks of 64
@example(problem=make_problem(batch=2, q_heads=4, kv_heads=2, q_len=3, kv_len=100, head_dim=64, causal=True,
                              dtype=torch.bfloat16, device=DEVICE))  # top-left causal: 3 keys of 100 read
def test_matches_reference(problem):
    kt.check_kernel(kernel(), problem, out_arg=True)


@given(problem=kt.decode_problems(head_dims=(16, 33, 64), kv_lens=st.integers(1, 100), device=DEVICE),
       config=st.sampled_from(sorted(SPLIT_CONFIGS)))
@example(problem=make_problem(batch=1, q_heads=4, kv_heads=1, q_len=2, kv_len=97, head_dim=64, mask="bool",
                              left_pad=(80,), distribution="masked_rows", seed=3, device=DEVICE),
         config="a split per block")  # whole splits with no key: their (0, -inf) states must merge away
def test_every_split_layout_matches_reference(problem, config):
    kt.check_kernel(kernel(SPLIT_CONFIGS[config]), problem, out_arg=True)


@pytest.mark.parametrize("distribution", sorted(kt.DISTRIBUTIONS))
@settings(max_examples=2)
@given(data=st.data())
def test_adversarial_data_across_splits(distribution, data):
    problem = data.draw(kt.decode_problems(head_dims=(64,), distributions=(distribution,), device=DEVICE))
    kt.check_kernel(kernel(SPLIT_CONFIGS["3 splits"]), problem, out_arg=True)


def test_rows_with_no_key_are_exactly_zero():
    p = make_problem(batch=2, q_heads=4, kv_heads=2, q_len=3, kv_len=40, head_dim=16, mask="bool", mask_heads=True,
                     distribution="masked_rows", seed=1, device=DEVICE)
    empty = ~p.attn_mask.any(-1)  # [B, Hq, Lq]
    assert empty.any() and not empty.all()
    for config in (SPLIT_CONFIGS["one split"], SPLIT_CONFIGS["a split per block"]):
        out = kt.check_kernel(kernel(config), p, out_arg=True)
        assert torch.equal(out[empty], torch.zeros_like(out[empty]))


@pytest.mark.parametrize("mask", ["bool", "additive"])
def test_head_broadcast_mask_equals_materialised_mask(mask):
    # [B, 1, 1, L] is loaded once per key; the same mask materialised per head goes through the
    # [rows, keys] gather: the same keep set and biases, so bit-identical outputs.
    p = make_problem(batch=2, q_heads=8, kv_heads=2, q_len=1, kv_len=50, head_dim=16, mask=mask, left_pad=(5, 30),
                     sparsity=0.5, dtype=torch.float16, seed=4, device=DEVICE)
    assert p.attn_mask.shape[1] == 1
    per_key = decode_attention(p.q, p.k, p.v, p.attn_mask, p.scale, config=SPLIT_CONFIGS["3 splits"])
    gathered = decode_attention(p.q, p.k, p.v, p.attn_mask.expand(2, 8, 1, 50).contiguous(), p.scale,
                                config=SPLIT_CONFIGS["3 splits"])
    assert torch.equal(per_key, gathered)
    kt.check_kernel(kernel(SPLIT_CONFIGS["3 splits"]), p, out_arg=True)


@settings(max_examples=4)
@given(problem=kt.decode_problems(masks=("bool", "additive"), head_dims=(16,), kv_lens=st.integers(1, 64),
                                  device=DEVICE))
def test_skipping_masked_keys_changes_nothing(problem):
    # A hidden key's weight is exp(-inf) = 0 whether its K/V were loaded or not.
    skip = decode_attention(problem.q, problem.k, problem.v, problem.attn_mask, problem.scale,
                            config=DecodeAttentionConfig(block_n=16, num_splits=2, skip_masked_keys=True))
    load = decode_attention(problem.q, problem.k, problem.v, problem.attn_mask, problem.scale,
                            config=DecodeAttentionConfig(block_n=16, num_splits=2, skip_masked_keys=False))
    assert torch.equal(skip, load)


@pytest.mark.parametrize("layout", ["hf_views", "cache_slice", "channels_strided"])
def test_any_strides(layout):
    p = make_problem(batch=2, q_heads=4, kv_heads=2, q_len=2, kv_len=40, head_dim=80, mask="bool", left_pad=(3, 0),
                     dtype=torch.bfloat16, seed=5, device=DEVICE)

    def restrided(q, k, v, attn_mask=None, scale=None, is_causal=False, out=None):
        B, Hq, Lq, D = q.shape
        if layout == "hf_views":  # q, k, v as transposed views of [B, L, H, D] projections
            q = q.transpose(1, 2).contiguous().transpose(1, 2)
            k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
        elif layout == "cache_slice":  # the first L slots of a static cache, and of its mask
            L = k.shape[2]
            k, v = (torch.cat([t, torch.full_like(t, math.nan)], 2)[:, :, :L] for t in (k, v))
            attn_mask = torch.cat([attn_mask, attn_mask], -1)[..., :L]
        else:  # a non-unit stride on the head dim: the launcher copies to make it contiguous
            k = k.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not (q.is_contiguous() and k.is_contiguous()) or layout == "channels_strided"
        return decode_attention(q, k, v, attn_mask, scale, is_causal, out=out,
                                config=SPLIT_CONFIGS["3 splits"])

    kt.check_kernel(restrided, p, out_arg=True)


def test_empty_cache_gives_zeros():
    q = torch.randn(1, 4, 1, 64, device=DEVICE)
    k = v = torch.randn(1, 2, 0, 64, device=DEVICE)
    out = decode_attention(q, k, v)
    assert torch.equal(out, torch.zeros_like(q))


def test_writes_into_out_and_returns_it():
    p = make_problem(batch=1, q_heads=4, kv_heads=4, q_len=1, kv_len=20, head_dim=16, device=DEVICE)
    out = kt.poisoned_like(p.q.new_empty(p.q.shape))
    assert decode_attention(p.q, p.k, p.v, out=out) is out
    kt.assert_all_written(out)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        decode_attention(p.q, p.k, p.v, out=out.transpose(1, 2))


def _inputs(B=1, Hq=4, Hkv=2, Lq=1, L=8, D=16, dtype=torch.float16, **overrides):
    t = dict(q=torch.randn(B, Hq, Lq, D, dtype=dtype, device=DEVICE),
             k=torch.randn(B, Hkv, L, D, dtype=dtype, device=DEVICE),
             v=torch.randn(B, Hkv, L, D, dtype=dtype, device=DEVICE), attn_mask=None)
    t.update(overrides)
    return t


@pytest.mark.parametrize("inputs, reason", [
    (_inputs(q=torch.randn(4, 1, 16, dtype=torch.float16, device=DEVICE)), "q has 3 dims"),
    (_inputs(dtype=torch.float64), "q dtype torch.float64"),
    (_inputs(v=torch.randn(1, 2, 8, 16, device=DEVICE)), "mixed dtypes"),
    (_inputs(Hq=3), "not a multiple of Hkv"),
    (_inputs(D=320), "head dim 320"),
    (_inputs(Lq=17), "query length 17"),
    (_inputs(v=torch.randn(1, 2, 9, 16, dtype=torch.float16, device=DEVICE)), "differ"),
    (_inputs(attn_mask=torch.ones(1, 1, 1, 8, dtype=torch.int32, device=DEVICE)), "neither bool nor floating"),
    (_inputs(attn_mask=torch.ones(1, 1, 1, 7, dtype=torch.bool, device=DEVICE)), "not broadcastable"),
    (_inputs(attn_mask=torch.ones(2, 1, 1, 8, dtype=torch.bool, device=DEVICE)), "not broadcastable"),
])
def test_unsupported_inputs_are_named_and_refused(inputs, reason):
    got = decode_attention_unsupported_reason(**inputs)
    assert got is not None and reason in got, got
    with pytest.raises(ValueError, match="decode_attention: "):
        decode_attention(**inputs)


@pytest.mark.parametrize("mask", [None, torch.ones(8, dtype=torch.bool), torch.zeros(4, 1, 8),
                                  torch.ones(1, 4, 1, 8, dtype=torch.bool)])
def test_supported_inputs_have_no_reason(mask):
    inputs = _inputs(attn_mask=None if mask is None else mask.to(DEVICE))
    assert decode_attention_unsupported_reason(**inputs, is_causal=True) is None


@given(programs=st.integers(1, 4096), kv_len=st.integers(0, 1 << 20), sm_count=st.integers(1, 256),
       block_n=st.sampled_from((16, 32, 64, 128)), programs_per_sm=st.integers(1, 8),
       min_blocks=st.integers(1, 8), forced=st.none() | st.integers(1, 1 << 17), whole_waves=st.booleans())
def test_split_rule_covers_the_cache_with_nonempty_splits(programs, kv_len, sm_count, block_n, programs_per_sm,
                                                          min_blocks, forced, whole_waves):
    config = DecodeAttentionConfig(block_n=block_n, programs_per_sm=programs_per_sm, min_blocks_per_split=min_blocks,
                                   num_splits=forced, whole_waves=whole_waves)
    splits, keys = choose_num_splits(programs, kv_len, sm_count, config)
    assert 1 <= splits <= 65535 and keys % block_n == 0
    assert splits * keys >= kv_len  # every key is in a split
    assert kv_len == 0 or (splits - 1) * keys < kv_len  # and no split is empty
    if forced is None:
        assert splits <= max(1, math.ceil(programs_per_sm * sm_count / programs))  # no more than the grid needs
        if whole_waves:  # and no more programs than the target, unless one split alone exceeds it
            assert splits == 1 or splits * programs <= programs_per_sm * sm_count


def test_rule_picks_tiles_by_how_far_batch_times_kv_heads_fills_the_gpu():
    # H100: 132 SMs; 8 KV heads.
    assert [grid_regime(b * 8, 132) for b in (1, 2, 4, 8, 16, 17, 32)] == [
        "tiny", "tiny", "small", "small", "small", "large", "large"]
    assert default_config(8, 132).num_splits is None
    splits, _ = choose_num_splits(8, 32768, 132, default_config(8, 132))
    assert splits >= 16  # B=1, L=32k: 8 programs without splits, ~one per SM with them
    assert choose_num_splits(256, 8192, 132, default_config(256, 132))[0] == 1  # B=32: no split


@pytest.mark.parametrize("field, value", [("block_n", 48), ("block_n", 8), ("num_warps", 3), ("num_stages", 0),
                                          ("programs_per_sm", 0), ("num_splits", 0), ("split_block", 100),
                                          ("max_registers", 170), ("max_registers", 16)])
def test_invalid_config_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        DecodeAttentionConfig(**{field: value})


def test_tiles_shrink_to_fit_shared_memory():
    # The benchmarked bf16 tiles fit as they are; fp32 (4-byte K/V tiles) and D=256 shrink.
    tiny = RULE_CONFIGS["tiny"]
    assert fit_shared_memory(tiny, 16, 128, 2, False, SMEM_FALLBACK) == tiny
    for elt, block_d, block_m, gathered in [(4, 128, 16, False), (2, 256, 64, True), (4, 256, 64, True)]:
        fitted = fit_shared_memory(tiny, block_m, block_d, elt, gathered, SMEM_FALLBACK)
        assert fitted != tiny
        assert shared_memory_bound(block_m, fitted.block_n, block_d, fitted.num_stages, elt, gathered) <= SMEM_FALLBACK


def test_packed_tiles_fit_by_their_code_bytes():
    # Packed caches pipeline 1-byte (int8/fp8) or half-byte (int4) codes plus one converted K and V tile:
    # the bound stays above what sm_90 compiles took (triton 3.9, bf16, D=128, BLOCK_M=16, measured with
    # triton.compile for GPUTarget("cuda", 90, 32)) and below the H100's limit, so no retry is needed.
    for block_n, stages, code_bytes, compiled in [(128, 3, 1, 108544), (128, 4, 1, 142336), (32, 5, 0.5, 29696)]:
        bound = shared_memory_bound(16, block_n, 128, stages, 2, False, code_bytes)
        assert compiled <= bound <= SMEM_FALLBACK, (block_n, stages, code_bytes, bound)
    tiny = RULE_CONFIGS["tiny"]
    assert fit_shared_memory(tiny, 16, 128, 2, False, SMEM_FALLBACK, 1) == tiny


def test_shared_memory_refusal_is_retried_smaller_and_remembered(monkeypatch):
    # A Triton version that allocates more than shared_memory_bound: the launch raises before
    # running anything; the launcher retries with fewer stages / smaller blocks and goes straight
    # there next time.
    from triton.runtime.errors import OutOfResources

    real = launcher.kernels.decode_attention_split_kernel
    refused = []

    class Refusing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs["num_stages"] > 2 or kwargs["BLOCK_N"] > 32:
                    refused.append((kwargs["BLOCK_N"], kwargs["num_stages"]))
                    raise OutOfResources(300000, SMEM_FALLBACK, "shared memory")
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(launcher.kernels, "decode_attention_split_kernel", Refusing())
    monkeypatch.setattr(launcher, "_SHRUNK", {})
    p = make_problem(batch=1, q_heads=4, kv_heads=2, q_len=1, kv_len=100, head_dim=16, device=DEVICE)
    config = DecodeAttentionConfig(block_n=128, num_stages=3, num_splits=2)
    kt.check_kernel(kernel(config), p, out_arg=True)
    assert refused == [(128, 3), (128, 2), (64, 2)]
    kt.check_kernel(kernel(config), p, out_arg=True)
    assert len(refused) == 3  # the second call went straight to (32, 2)
