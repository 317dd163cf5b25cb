"""Early termination with a proven bound (lowering/attention/early_exit/: bound.py, launcher.py, kernel.py).

What is checked, on random and adversarial problems from ``kvpass.testing`` (GQA/MQA, fp32/fp16/bf16,
bool/additive masks with left padding, Lq 1-4, L from 1 to several blocks):

- the theorem, in float64 with no kernel: for any set of blocks read, ||o - o_R||_2 <= eps;
- the Triton kernel (interpreter on CPU) and the torch reference: (1) the output is the exact attention
  over the blocks they report as read, within the exact-kernel tolerance ``tolerance_for`` (worst-case
  fp32/dtype rounding, kvpass.testing.tolerance.exact_tolerance); (2) the error against full float64
  attention is within the stated bound: per row, ||out - o||_2 <= tol (||out||_2 + ||delta||_2) +
  ||delta||_2, delta the exact tolerance of (1) (follows from the theorem and the stop rule); (3) with
  tol = 0 every block holding a key of nonzero weight and nonzero value is read;
- summaries built piecewise on append equal summaries built at once (bit for bit);
- the Dense format with early_exit through ``kvpass::cache_attention`` (16-bit and int8) and its stats.

``BLOCK`` is patched to 16 so that the CI sizes (L <= 160) span up to 10 blocks.
"""
import dataclasses
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvpass.testing as kt
import lowering.ops  # noqa: F401  (registers torch.ops.kvpass.*)
from kvpass.testing import make_problem
from kvpass.testing.oracles import F64, grouped_matmul, logit_bias, reference_scores, safe_softmax
from kvpass.testing.pytest_plugin import triton_interpreter_problem
from lowering.attention.early_exit import bound as ee
from lowering.attention.early_exit.launcher import bounded_attention_triton
from lowering.core import packed, stats
from lowering.formats import FormatSpec, build_format
from lowering.formats.early_exit import DEFAULT_TOLERANCE, resolve_tolerance

DEVICE = kt.default_device()
TRITON_OK = not (DEVICE == "cpu" and triton_interpreter_problem() == "TRITON_INTERPRET is not set")
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton kernels need TRITON_INTERPRET=1 on the CPU")
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
TEST_BLOCK = 16
# ~5 s per kernel example under the interpreter on 2 shared cores: 4 on CI, the profile's count elsewhere.
INTERPRETED_EXAMPLES = 4 if kt.profile_name() == "ci" else settings.default.max_examples
TOLERANCES = (0.0, 1e-3, 1e-1, 0.5)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(ee, "BLOCK", TEST_BLOCK)


def peaked(problem, gap: float = 25.0):
    """The problem with every key shrunk 20x except one per KV head, aligned with its group's mean query
    and ``gap`` logits above the rest: attention concentrated enough for the bound to skip blocks."""
    p = problem
    B, Hkv, L, D = p.k.shape
    q_mean = p.q.double().reshape(B, Hkv, -1, D).mean(2)  # [B, Hkv, D]
    k = p.k.double() * 0.05
    key = gap / p.softmax_scale * q_mean / q_mean.square().sum(-1, keepdim=True).clamp_min(1e-12)
    k[:, :, p.spec.seed % L] = key
    return dataclasses.replace(p, k=k.to(p.dtype))


def run(impl, p, tol):
    s = ee.build_summaries(p.k, p.v)
    plan = ee.plan_visits(p.q, s, p.kv_len, p.attn_mask, p.softmax_scale)
    fn = bounded_attention_triton if impl == "triton" else ee.bounded_attention_reference
    out, read = fn(p.q, p.k, p.v, plan, p.attn_mask, p.softmax_scale, tol)
    return out, read, plan


def read_token_mask(p, plan, read):
    blocks = ee.read_mask(plan, read)  # [B, Hkv, nb]
    tokens = blocks.repeat_interleave(TEST_BLOCK, -1)[..., :p.kv_len]  # [B, Hkv, L]
    return tokens.repeat_interleave(p.group, 1)[:, :, None, :]  # [B, Hq, 1, L]


def restricted(p, keep):
    """The problem with the keys outside ``keep`` [B, Hq, 1, L] hidden: attention over the read set."""
    bias = logit_bias(p.attn_mask, p.is_causal, p.q_len, p.kv_len, p.q.device)
    mask = torch.isfinite(bias) & keep if p.attn_mask is None or p.attn_mask.dtype == torch.bool else None
    if mask is None:
        mask = torch.where(keep, p.attn_mask, float("-inf")).to(p.attn_mask.dtype)
    return dataclasses.replace(p, attn_mask=mask)


def check_against_bound(out, p, plan, read, tol):
    assert out.shape == p.q.shape and out.dtype == p.dtype
    kt.assert_all_written(out)
    # (1) exact attention over the blocks read
    pr = restricted(p, read_token_mask(p, plan, read))
    ref_read = kt.reference_attention(pr)
    tolerance = kt.tolerance_for(pr)
    kt.assert_attention_close(out, ref_read, tolerance, context=f"read set of {p!r}, tol={tol}")
    # (2) full attention within the stated bound
    delta = tolerance.allowed(ref_read).norm(dim=-1, keepdim=True)
    bound = tol * (out.double().norm(dim=-1, keepdim=True) + delta) + delta
    ref = kt.reference_attention(p)
    assert kt.early_exit_bound_holds(out, ref, bound), (
        f"{p!r} tol={tol}: max row error {(out.double() - ref).norm(dim=-1).max().item():.3g} > bound, "
        f"blocks read {read.tolist()} of {plan.order.shape[-1]}")
    # (3) tol = 0: every block holding a key of nonzero weight and nonzero value is read (a finfo.min bias
    # hides a key as -inf does: exp underflows to 0 in float64; zero values add exactly nothing)
    if tol == 0:
        attended = (kt.reference_probs(p)[1] > 0) & (p.v != 0).any(-1).repeat_interleave(p.group, 1)[:, :, None]
        per_kv = attended.reshape(p.batch, p.kv_heads, -1, p.kv_len).any(2)
        nb = plan.order.shape[-1]
        padded = torch.nn.functional.pad(per_kv, (0, nb * TEST_BLOCK - p.kv_len))
        needed = padded.view(p.batch, p.kv_heads, nb, TEST_BLOCK).any(-1)
        assert not (needed & ~ee.read_mask(plan, read)).any(), f"tol=0 skipped an attended block of {p!r}"


problems = kt.decode_problems(head_dims=(16, 32, 64), causal=(False,), device=DEVICE)


@given(problem=problems, data=st.data())
def test_theorem_holds_for_any_read_set(problem, data):
    # float64: eps = r (Vmax_U + ||o_R||), r = W / (Z_R + W), W = sum_unread n_c exp(B_c); any subset R.
    p = problem
    nb = ee.num_blocks(p.kv_len)
    picks = data.draw(st.lists(st.booleans(), min_size=nb, max_size=nb))
    read_blocks = torch.tensor(picks, device=p.q.device).repeat_interleave(TEST_BLOCK)[:p.kv_len]
    s = reference_scores(p.q, p.k, p.attn_mask, p.is_causal, p.scale)  # [B, Hq, Lq, L] float64
    probs = safe_softmax(s)
    o = grouped_matmul(probs, p.v.to(F64))
    s_read = s.masked_fill(~read_blocks, -math.inf)
    o_read = grouped_matmul(safe_softmax(s_read), p.v.to(F64))
    k64 = torch.nn.functional.pad(p.k.to(F64), (0, 0, 0, nb * TEST_BLOCK - p.kv_len), value=math.nan)
    blocks = k64.view(p.batch, p.kv_heads, nb, TEST_BLOCK, p.head_dim)
    kmin, kmax = blocks.nan_to_num(math.inf).amin(3), blocks.nan_to_num(-math.inf).amax(3)
    q = p.q.to(F64) * p.softmax_scale
    bound = (grouped_matmul(q.clamp_min(0), kmax.transpose(-1, -2))
             + grouped_matmul(q.clamp_max(0), kmin.transpose(-1, -2)))
    bias = torch.nn.functional.pad(logit_bias(p.attn_mask, False, p.q_len, p.kv_len, p.q.device),
                                   (0, nb * TEST_BLOCK - p.kv_len), value=-math.inf)
    bound = bound + bias.view(*bias.shape[:-1], nb, TEST_BLOCK).amax(-1)  # [B, Hq, Lq, nb]
    block_max = torch.nn.functional.pad(s, (0, nb * TEST_BLOCK - p.kv_len), value=-math.inf)
    block_max = block_max.view(*s.shape[:-1], nb, TEST_BLOCK).amax(-1)
    hidden = block_max == -math.inf  # (also where the bound is -inf: -inf + inf would be NaN)
    assert (hidden | (block_max <= bound + 1e-9 * bound.abs().clamp_min(1))).all(), "a score exceeds its block's bound"
    tokens = torch.tensor([min(TEST_BLOCK, p.kv_len - c * TEST_BLOCK) for c in range(nb)], dtype=F64,
                          device=p.q.device)
    unread = ~torch.tensor(picks, device=p.q.device)
    log_w = torch.logsumexp(torch.where(unread, bound + tokens.log(), -math.inf), -1)
    log_z = torch.logsumexp(s_read, -1)
    r = torch.where(log_w == -math.inf, 0.0, torch.sigmoid(log_w - log_z))
    vnorm = torch.nn.functional.pad(p.v.to(F64).norm(dim=-1), (0, nb * TEST_BLOCK - p.kv_len))
    vmax = torch.where(unread, vnorm.view(p.batch, p.kv_heads, nb, TEST_BLOCK).amax(-1), 0.0).amax(-1)
    vmax = vmax.repeat_interleave(p.group, 1)[:, :, None]  # [B, Hq, 1]
    eps = r * (vmax + o_read.norm(dim=-1))
    err = (o - o_read).norm(dim=-1)
    assert (err <= eps * (1 + 1e-9) + 1e-12).all(), f"{p!r}: error {err.max().item():.3g} > eps"


def error_within_the_stated_bound(impl, problem, tol, concentrated):
    p = peaked(problem) if concentrated else problem
    out, read, plan = run(impl, p, tol)
    check_against_bound(out, p, plan, read, tol)


EXAMPLES = [
    dict(problem=make_problem(batch=2, q_heads=8, kv_heads=2, q_len=2, kv_len=150, head_dim=32, mask="bool",
                              left_pad=(20, 0), dtype=torch.float16, seed=5, device=DEVICE),
         tol=0.0, concentrated=True),
    # a row with no key (output 0); finfo.min hides keys with a finite bias
    dict(problem=make_problem(batch=1, q_heads=4, kv_heads=1, q_len=1, kv_len=97, head_dim=16, mask="additive",
                              left_pad=(40,), mask_value="min", distribution="masked_rows", seed=2, device=DEVICE),
         tol=1e-3, concentrated=False),
    # tol = 0 with finfo.min padding: those keys weigh exactly 0 and may be skipped (found by hypothesis)
    dict(problem=make_problem(batch=2, q_heads=1, kv_heads=1, q_len=4, kv_len=142, head_dim=16, mask="additive",
                              left_pad=(0, 54), mask_causal=True, mask_value="min", scale=0.09897, device=DEVICE),
         tol=0.0, concentrated=False),
    # all values zero: nothing can change the output, nothing needs reading (found by hypothesis)
    dict(problem=make_problem(batch=1, q_heads=1, kv_heads=1, q_len=1, kv_len=1, head_dim=16,
                              distribution="zero_values", device=DEVICE), tol=0.0, concentrated=False),
]


def with_examples(test):
    for kwargs in reversed(EXAMPLES):
        test = example(**kwargs)(test)
    return test


@given(problem=problems, tol=st.sampled_from(TOLERANCES), concentrated=st.booleans())
@with_examples
def test_reference_error_within_the_stated_bound(problem, tol, concentrated):
    error_within_the_stated_bound("reference", problem, tol, concentrated)


@needs_triton
@settings(max_examples=INTERPRETED_EXAMPLES)
@given(problem=problems, tol=st.sampled_from(TOLERANCES), concentrated=st.booleans())
@with_examples
def test_kernel_error_within_the_stated_bound(problem, tol, concentrated):
    error_within_the_stated_bound("triton", problem, tol, concentrated)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_concentrated_attention_skips_blocks(impl, dtype):
    # The stop is not vacuous: one key 25 logits above the rest lets the bound drop most blocks.
    p = peaked(make_problem(batch=2, q_heads=4, kv_heads=2, q_len=1, kv_len=160, head_dim=32, dtype=dtype, seed=9,
                                  device=DEVICE))
    out, read, plan = run(impl, p, 1e-3)
    assert (read < plan.order.shape[-1]).all() and (read >= 1).all(), read
    check_against_bound(out, p, plan, read, 1e-3)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "reference"])
def test_recorded_model_attention(impl):
    # Real q/K/V (SmolLM2-135M layer 15, bench/data): the bound holds; Hq 9 over Hkv 3.
    rec = torch.load("bench/inputs/smollm2_attention.pt")["layers"]["15"]
    L = 128  # 8 blocks of 16
    p = dataclasses.replace(make_problem(batch=1, q_heads=9, kv_heads=3, q_len=1, kv_len=L, head_dim=64,
                                         dtype=torch.float16, scale=rec["scale"]),
                            q=rec["q"][:, :, -1:].to(DEVICE), k=rec["k"][:, :, :L].to(DEVICE),
                            v=rec["v"][:, :, :L].to(DEVICE))
    for tol in (0.0, 1e-1):
        out, read, plan = run(impl, p, tol)
        check_against_bound(out, p, plan, read, tol)


@needs_triton
@settings(max_examples=INTERPRETED_EXAMPLES)
@given(problem=problems)
def test_no_exit_baseline_is_exact(problem):
    def baseline(q, k, v, attn_mask=None, scale=None, is_causal=False):
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        return bounded_attention_triton(q, k, v, None, attn_mask, scale, 0.0, early_exit=False)[0]

    kt.check_kernel(baseline, problem)


@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=5), dtype=st.sampled_from(kt.strategies.DTYPES))
def test_summaries_updated_on_append_equal_summaries_built_at_once(lengths, dtype):
    g = torch.Generator().manual_seed(sum(lengths))
    total = sum(lengths)
    k = (torch.randn(2, 3, total, 8, generator=g) * 4).to(dtype)
    v = torch.randn(2, 3, total, 8, generator=g).to(dtype)
    state, done = None, 0
    for n in lengths:
        out = {name: torch.full(shape, math.nan, dtype=dt) if dt.is_floating_point else torch.empty(shape, dtype=dt)
               for name, (shape, dt) in ee.summary_layout(2, 3, done + n, 8, dtype).items()}
        ee.update_summaries(state, done, k[:, :, done:done + n], v[:, :, done:done + n], out)
        state, done = out, done + n
    whole = ee.build_summaries(k, v)
    for name in ee.SECTIONS:
        assert torch.equal(state[name], whole[name]), name
    blocks = torch.nn.functional.pad(k.float(), (0, 0, 0, ee.num_blocks(total) * TEST_BLOCK - total), value=math.nan)
    assert torch.equal(whole["ee_kmin"].float(), blocks.view(2, 3, -1, TEST_BLOCK, 8).nan_to_num(math.inf).amin(3))
    assert (whole["ee_vmax"] >= 0).all()


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_dense_format_decodes_within_the_bound_and_counts_blocks(kv_bits):
    tol = 1e-2
    spec = FormatSpec(kv_bits=kv_bits, early_exit=tol).to_json()
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, L0 = 1, 4, 2, 32, 70
    k_all = torch.randn(B, Hkv, L0 + 3, D, generator=g) * 0.05
    k_all[:, :, 3] = 40.0 * torch.randn(D, generator=g) / math.sqrt(D)  # a sink
    v_all = torch.randn(B, Hkv, L0 + 3, D, generator=g)
    q_all = k_all[:, :, 3:4].repeat_interleave(Hq // Hkv, 1).expand(B, Hq, L0 + 3, D).contiguous()
    stats.clear()
    empty = torch.empty(0)
    out, kbuf, vbuf = torch.ops.kvpass.cache_attention(q_all[:, :, :L0], empty, empty, k_all[:, :, :L0],
                                                       v_all[:, :, :L0], None, True, None, spec, "layer0")
    fmt = build_format(spec)
    assert set(ee.SECTIONS) <= set(fmt.layout(B, Hkv, L0, D, D, torch.float32))
    for t in range(L0, L0 + 3):
        past_k = packed.slot_view(kbuf, (B, Hkv, t, D))
        past_v = packed.slot_view(vbuf, (B, Hkv, t, D))
        out, kbuf, vbuf = torch.ops.kvpass.cache_attention(q_all[:, :, t:t + 1], past_k, past_v,
                                                           k_all[:, :, t:t + 1], v_all[:, :, t:t + 1], None, False,
                                                           None, spec, "layer0")
        sections = packed.views(packed.whole_buffer(kbuf), fmt.layout(B, Hkv, t + 1, D, D, torch.float32))
        k_seen, v_seen = fmt.storage.dequantize(
            {n: s for n, s in sections.items()
             if n not in ee.SECTIONS}, t + 1, torch.float32)
        ref = kt.reference_attention(q_all[:, :, t:t + 1], k_seen, v_seen)
        # tol relative to the output, plus 1e-5 for fp32 rounding over 73 keys (exact_tolerance: < 1e-5 here)
        bound = tol * out.double().norm(dim=-1, keepdim=True) * (1 + tol) + 1e-5
        assert kt.early_exit_bound_holds(out, ref, bound)
    counts = stats.snapshot()["layer0"]
    assert counts["blocks_total"] == sum(B * Hkv * ee.num_blocks(t + 1) for t in range(L0, L0 + 3))
    assert counts["blocks_read"] < counts["blocks_total"]


def test_options_accept_early_exit():
    import kvpass

    kvpass.validate_options({"early_exit": 1e-3})
    kvpass.validate_options({"early_exit": True})
    kvpass.validate_options({"early_exit": 0})
    assert resolve_tolerance(True) == DEFAULT_TOLERANCE and resolve_tolerance(None) is None
    for bad in (1.0, -1e-3, "fast", False):
        with pytest.raises(ValueError, match="early_exit"):
            kvpass.validate_options({"early_exit": bad})
