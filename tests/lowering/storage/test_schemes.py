"""Every quantized storage scheme (lowering/storage): round trip within its stated step, the fused decode
kernel against float64 oracles, appends, and the CPU reference path.

Two oracles per problem (``kvpass.testing``): the float64 attention over the scheme's *dequantized* cache
(``quantized_attention``; the kernel must match it within the exact-kernel tolerance ``tolerance_for``,
since it dequantizes in registers to the very values ``dequantize`` returns), and the float64 attention over
the unquantized cache, within that tolerance plus the error the quantization step can cause
(``quantization_bound``). Schemes state their per-element step bound in ``error_bound``:
int8 scale / 2 (sqrt(D) scale / 2 where it stores rows rotated), int4 scale / 2 (0 in the residual window),
fp8 max(|x^| / 15, 2^-10 scale), aligned s / 2, each plus the roundings to fp32 and the dtype
(``lowering.storage.int8.rounding_slack``). int8's rotated rows (x H) are checked where the kernel computes,
in the stored domain, and its turned-back output against the unquantized oracle (``stored_domain``).
The aligned scheme runs here with tau = 0 (every low part read: a 12-bit cache); its skip rule is tested
in test_aligned.py. Triton runs under TRITON_INTERPRET=1 on the CPU (conftest.py).
"""
from __future__ import annotations

import dataclasses
import functools
from unittest import mock

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import kvpass.testing as kt
from kvpass.testing import make_problem
from kvpass.testing.oracles import F64, grouped_matmul, reference_scores, safe_softmax
from kvpass.testing.pytest_plugin import triton_interpreter_problem
from kvpass.testing.tolerance import _weight_spread
from lowering.attention.decode import launcher
from lowering.attention.decode.launcher import DecodeAttentionConfig, packed_config
from lowering.core.operands import KV_SCALED_ROWS, KVOperands
from lowering.core.packed import allocate, layout_nbytes
from lowering.core.rotation import rotates, shifts, signs
from lowering.formats import launch
from lowering.storage import SCHEMES, token_blocks
from lowering.storage.int8 import codes_as_float, rounding_unit

DEVICE = kt.default_device()
QUANTIZED = ("8", "4", "fp8", "aligned")
KERNEL_OPTIONS = {"aligned": {"tau": 0.0}}  # the skip rule is tested on its own
HEAD_DIMS = (16, 33, 64)  # odd: int4 / aligned nibbles pad the last byte

needs_kernel = pytest.mark.skipif(DEVICE == "cpu" and triton_interpreter_problem() == "TRITON_INTERPRET is not set",
                                  reason="Triton kernels need TRITON_INTERPRET=1 on the CPU")
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")


def pack(scheme, k, v, chunks=None, poison=None):
    """The scheme's sections holding k, v [B, Hkv, L, D], appended in ``chunks`` (token counts; one
    append of everything by default) by ``scheme.append``; with ``poison`` (a byte), each new buffer is filled with
    it first and the appends go through ``launch.append`` (the append kernel on CUDA, as the caches append)."""
    B, H, L, D = k.shape
    state, done = None, 0
    for n in chunks or [L]:
        buffer, out = allocate(scheme.layout(B, H, done + n, D, v.shape[-1], k.dtype), k.device)
        if poison is not None:
            buffer.fill_(poison)
        append = scheme.append if poison is None else functools.partial(launch.append, scheme)
        append(state, done, k[:, :, done:done + n], v[:, :, done:done + n], out)
        state, done = out, done + n
    return state


def kernel(scheme, state, length, **options):
    """check_kernel's calling convention over a packed state (the k, v it passes are ignored)."""
    def fn(q, k, v, attn_mask=None, scale=None, is_causal=False, out=None):
        assert not is_causal
        return launch.kernel_decode_attention(scheme, q, state, length, attn_mask, scale, out=out, **options)

    fn.__name__ = f"{scheme.name} kernel {options or ''}"
    return fn


def quantization_bound(problem, ek, ev) -> torch.Tensor:
    """Per-element bound of |attention over k^, v^ - attention over k, v| when |k - k^| <= ek and
    |v - v^| <= ev elementwise (float64 [B, Hq, Lq, D]).

    Scores move by at most delta_j = scale sum_d |q_d| ek_jd; the weights then move by at most w_j
    (the exact softmax interval of kvpass.testing.tolerance, not linearised), so
    |o^ - o| <= sum_j w_j |v_j| + sum_j (p_j + w_j) ev_j."""
    p = problem
    s = reference_scores(p.q, p.k, p.attn_mask, p.is_causal, p.scale)
    probs = safe_softmax(s)
    delta = p.softmax_scale * grouped_matmul(p.q.to(F64).abs(), ek.transpose(-1, -2))
    delta = torch.where(torch.isfinite(s), delta.expand_as(s), torch.zeros_like(s))
    w = _weight_spread(s, delta, probs)
    return grouped_matmul(w, p.v.to(F64).abs()) + grouped_matmul(probs + w, ev)


def kernel_dequantized(scheme, state, length, dtype, query=None, **options):
    """The values the kernel attends over: ``dequantize`` (fp32 product rounded to the dtype), except that
    Triton's CPU interpreter truncates fp32 to bf16 instead of rounding (kvpass.testing.tolerance), so
    under it bf16 tiles are the fp32 values truncated.

    Schemes with ``kernel_attends_over_products`` (int8, fp8) never round a dequantized tile: the kernel
    multiplies the scores by the key scales and the weights by the value scales, so it attends over
    code * scale itself; the oracle is ``dequantize`` in fp32 (one rounding of the product, 2^-24
    relative, inside the exact model's (D + 4) 2^-24 score term). The exact tolerance still applies
    unchanged: the scores are a dot of exact dtype values (codes) with fp32 accumulation and two more
    roundings (times scale_k * sm_scale), and p * scale_v is rounded once to the dtype before the PV
    product, u p_j scale_j |c_jd| = u p_j |v_jd|, the model's "p rounding" term. fp16 values excepted:
    there the kernel dequantizes value tiles as before (``FOLD_V_SCALE``).

    int4 keys scored by the folded query's split (``kernel_keys`` of ``query``): the exact keys, the scores'
    error given by ``kernel_score_error`` (``split_query_allowance``)."""
    if getattr(scheme, "kernel_attends_over_products", False):
        k, v = scheme.dequantize(state, length, torch.float32, **options)
        if dtype == torch.float16:  # fp16 keeps dequantized value tiles (subnormal p * scale_v otherwise)
            v = scheme.dequantize(state, length, dtype, **options)[1]
        return k, v
    if not (DEVICE == "cpu" and dtype == torch.bfloat16):
        k, v = scheme.dequantize(state, length, dtype, **options)
    else:
        k, v = tuple((x.view(torch.int32) & -65536).view(torch.float32).to(dtype)
                     for x in scheme.dequantize(state, length, torch.float32, **options))
    exact_keys = None if query is None else getattr(scheme, "kernel_keys", lambda *args: None)(query, state, length)
    return (k, v) if exact_keys is None else (exact_keys, v)


def kernel_tolerance(scheme, state, length, deq):
    """(values the kernel attends over, the exact-kernel tolerance over them) for ``deq`` (the problem
    holding ``kernel_dequantized``'s k, v).

    int4 values with bf16 / fp32 queries (``kernel_folds_values``): the kernel computes
    (p * scale_v) @ c + p . min_v, so the oracle is the exact c * scale_v + min_v, and the rounding of
    p * scale_v to the dtype errs by u p_j |c_jd scale_j| rather than the model's u p_j |v_jd| (|c scale|
    exceeds |v| where the minimum cancels it); the fp32 sum p . min_v adds L u32 p_j |min_j|. The exact
    model with |v_jd| replaced by |c_jd scale_j| + |min_j| (>= |v_jd|) covers both: its p-rounding,
    accumulation and softmax-spread terms all scale with that magnitude."""
    if not (getattr(scheme, "kernel_folds_values", False) and deq.dtype != torch.float16):
        return deq.v, kt.tolerance_for(deq)
    v_exact, magnitude = scheme.kernel_values(state, length)
    tol = kt.tolerance_for(dataclasses.replace(deq, v=magnitude))
    return v_exact, dataclasses.replace(tol, why="folded int4 values, |v| -> |c scale| + |min|: " + tol.why)


def score_allowance(problem, delta) -> torch.Tensor:
    """Bound of how far the attention output moves when score j moves by at most ``delta`` (float64,
    broadcastable to the scores, before the softmax scale), pushed through softmax as in ``quantization_bound``
    (the exact interval of kvpass.testing.tolerance), times |v|."""
    s = reference_scores(problem.q, problem.k, problem.attn_mask, problem.is_causal, problem.scale)
    delta = problem.softmax_scale * delta.expand_as(s)
    delta = torch.where(torch.isfinite(s), delta, torch.zeros_like(s))
    return grouped_matmul(_weight_spread(s, delta, safe_softmax(s)), problem.v.to(F64).abs())


def query_perturbation(problem, dq) -> torch.Tensor:
    """``score_allowance`` for a query that moves by at most ``dq`` per element (float64, broadcastable to q):
    scores by <= sum_d dq_d |k_jd|."""
    return score_allowance(problem, grouped_matmul(dq.expand_as(problem.q).to(F64),
                                                   problem.k.to(F64).abs().transpose(-1, -2)))


def split_query_allowance(scheme, problem, state, length) -> torch.Tensor | float:
    """The key scores' split (0 for schemes whose kernel reads the query as is): int8's 16-bit fixed point of
    the query it reads (``kernel_query_error``), ``query_perturbation`` of that bound; int4's split of the query
    folded with each key group's scales, whose score error the scheme bounds itself (``kernel_score_error``)."""
    dq = getattr(scheme, "kernel_query_error", lambda q: None)(problem.q)
    if dq is not None:
        return query_perturbation(problem, dq)
    ds = getattr(scheme, "kernel_score_error", lambda *args: None)(problem.q, state, length)
    return 0.0 if ds is None else score_allowance(problem, ds)


def rotations(problem):
    """(rows' rotation H 2^-floor(m/2), the query's and turn-back's H 2^-ceil(m/2)), float64
    (lowering/core/rotation.py)."""
    h = signs(problem.head_dim, problem.q.device)
    row_shift, query_shift = shifts(problem.head_dim)
    return h * 2.0 ** -row_shift, h * 2.0 ** -query_shift


def query_slack(problem, exact_rotated):
    """Bound of |rotated query - exact_rotated| per element: one rounding to the dtype (``rounding_unit``
    covers the interpreter's truncation) plus the fp32 butterfly's D 2^-24 |q|_2 (lowering/core/rotation.py)."""
    return (rounding_unit(problem.dtype) * exact_rotated.abs()
            + problem.head_dim * 2.0 ** -24 * problem.q.to(F64).norm(dim=-1, keepdim=True))


def stored_domain(scheme, problem):
    """A scheme that stores rows rotated (int8) has its kernel checked where it computes: the same scheme
    reading its rows as stored (no rotation) on the problem as the kernel sees it (the query rotated and
    rounded to the dtype, as ``kernel_query`` hands it; rows rotated exactly, in float64). Other schemes:
    unchanged."""
    if not getattr(scheme, "rotation", False) or not rotates(problem.head_dim):
        return scheme, problem
    raw = scheme.without_rotation()
    rows, query = rotations(problem)
    q_rot, exact = scheme.kernel_query(problem.q), problem.q.to(F64) @ query
    # checked here, since the allowances below are built from it
    assert q_rot.dtype == problem.dtype and ((q_rot.to(F64) - exact).abs() <= query_slack(problem, exact)).all(), \
        "query not q H"
    return raw, dataclasses.replace(problem, q=q_rot, k=problem.k.to(F64) @ rows, v=problem.v.to(F64) @ rows)


def check_scheme(key, problem, chunks=None, config=None):
    """Kernel vs the dequantized oracle (exact tolerance) and vs the unquantized oracle (+ step bound);
    ``config``: a kernel configuration (None: the rule's). Rotating schemes: both in the stored domain
    (``stored_domain``), then the turned-back output against the unquantized oracle (``check_turned_back``)."""
    scheme = SCHEMES[key]
    options = dict(KERNEL_OPTIONS.get(key, {}))
    if config is not None:
        options["config"] = config
    state = pack(scheme, problem.k, problem.v, chunks)
    refusal = getattr(scheme, "kernel_refusal", lambda q: None)(problem.q)
    assume(refusal is None)  # such inputs take the reference path (test_cpu_reference_path_...)
    raw, stored = stored_domain(scheme, problem)
    L = problem.kv_len
    kd, vd = kernel_dequantized(raw, state, L, problem.dtype, query=stored.q)
    vd, tolerance = kernel_tolerance(raw, state, L, dataclasses.replace(stored, k=kd, v=vd))
    deq = dataclasses.replace(stored, k=kd, v=vd)
    ref_deq = kt.quantized_attention(stored, lambda k: kd, lambda v: vd)
    split = split_query_allowance(raw, deq, state, L)  # the query the key scores use (int8, int4); 0 otherwise
    if not isinstance(split, float):
        tolerance = kt.Tolerance(atol=tolerance.allowed(ref_deq) + split, rtol=0.0,
                                 why="the query's split (split_query_allowance) + " + tolerance.why)
    out = kt.check_kernel(kernel(raw, state, L, **options), deq, reference=ref_deq,
                          tolerance=tolerance, out_arg=True)
    ek, ev = raw.error_bound(state, L, problem.dtype)
    allowed = tolerance.allowed(ref_deq) + quantization_bound(stored, ek, ev)
    kt.assert_attention_close(out, kt.reference_attention(stored), kt.Tolerance(
        atol=allowed, rtol=0.0, why=f"{scheme.name}: exact-kernel tolerance over the dequantized cache + the "
                                    "quantization step pushed through softmax (quantization_bound)"),
        context=f"{scheme.name} vs unquantized attention on {stored!r}")
    if raw is not scheme:
        out = check_turned_back(scheme, state, problem, stored, allowed, options)
    return out


def check_turned_back(scheme, state, problem, stored, allowed_stored, options):
    """The rotating scheme's kernel (it rotates the query and turns its output back itself) against float64
    attention over the unquantized k, v. Allowed: the stored-domain allowance carried through the turn-back
    (entries +-2^-ceil(m/2) <= D^-1/2: per element <= the row's L2 norm of it, Cauchy-Schwarz), the query's
    rounding after its rotation (any rounding within ``query_slack``, so the interpreter's truncation too,
    and the 16-bit split of int8's key scores, carried back through the rows' rotation: ``query_perturbation``),
    and the turn-back's fp32 butterfly and rounding to the dtype (D 2^-24 |o|_2 + u |o|, each doubled)."""
    rows, query = rotations(problem)
    slack = query_slack(problem, problem.q.to(F64) @ query)
    split = getattr(scheme, "kernel_query_error", lambda q: None)(problem.q)  # after the rounding, in the stored basis
    if split is not None:
        slack = slack + split
    query_rounding = query_perturbation(problem, slack @ rows.abs())
    ref = kt.reference_attention(problem).to(F64)
    turn_back = (problem.head_dim * 2.0 ** -24 * ref.norm(dim=-1, keepdim=True) * 2
                 + rounding_unit(problem.dtype) * ref.abs() * 2)
    allowed = allowed_stored.norm(dim=-1, keepdim=True) + query_rounding + turn_back
    return kt.check_kernel(kernel(scheme, state, problem.kv_len, **options), problem, reference=ref,
                           tolerance=kt.Tolerance(atol=allowed, rtol=0.0, why=(
                               f"{scheme.name}: the stored-domain allowance through H + the rotated query's "
                               "rounding + the turn-back")), out_arg=True)


@needs_kernel
@settings(max_examples=8)
@given(problem=kt.decode_problems(head_dims=(8, 16, 64), q_lens=st.integers(1, 2), kv_lens=st.integers(1, 100),
                                  causal=(False,), device=DEVICE), splits=st.sampled_from((1, 3)),
       by_mma=st.booleans(), split_query=st.booleans())
def test_rotated_int8_turns_its_output_back_in_either_stage(problem, splits, by_mma, split_query):
    """int8 rotates the query as stage 1 loads it (by the butterfly or by one MMA against H) and turns the
    output back where it is written: in stage 1 with one split, in the merge with several (the rule takes
    one split at these lengths on the CPU); with the query's split for the key scores or, as the rule's
    tiny regime runs, the converted codes."""
    check_scheme("8", problem, config=DecodeAttentionConfig(block_n=16, num_splits=splits, rotate_query_by_mma=by_mma,
                                                            split_query=split_query))


def test_rule_takes_the_query_split_only_where_programs_fill_the_gpu():
    """int8's split pays at B=8 and B=32 (8 KV heads, 132 SMs) and not at B=1 (bench/RESULTS.md)."""
    kv = KVOperands(None, None, 1, KV_SCALED_ROWS, ())
    assert [packed_config(programs, 132, kv).split_query for programs in (8, 64, 256)] == [False, True, True]


@pytest.mark.parametrize("key", QUANTIZED)
@settings(max_examples=8)
@given(problem=kt.attention_problems(head_dims=(16, 33, 64, 128), q_lens=(1,), kv_lens=st.integers(1, 100),
                                     causal=(False,)), data=st.sampled_from(("as drawn", "zero rows", "huge value")))
def test_round_trip_within_the_stated_step(key, problem, data):
    scheme = SCHEMES[key]
    k, v = problem.k.clone(), problem.v.clone()
    if data == "zero rows":  # a zero token (int8/fp8/aligned scale 0) and a zero key group (int4)
        k[:, :, : min(40, k.shape[2])] = 0
        v[:, :, -1] = 0
    elif data == "huge value":  # one element dominates its row / group
        k[0, 0, -1, 0] = v[0, 0, 0, -1] = 0.25 * torch.finfo(problem.dtype).max
    state = pack(scheme, k, v)
    for name, x, x_hat, bound in zip("kv", (k, v), scheme.dequantize(state, problem.kv_len, problem.dtype),
                                     scheme.error_bound(state, problem.kv_len, problem.dtype)):
        assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
        err = (x_hat.double() - x.double()).abs()
        assert torch.isfinite(x_hat).all() and (err <= bound).all(), (
            f"{scheme.name} {name}: |x - x^| max {err.max():.3g}, worst err/bound {(err / bound).max():.3g} "
            f"on {problem!r} ({data})")


@needs_kernel
@pytest.mark.parametrize("key", QUANTIZED)
@settings(max_examples=4)
@given(problem=kt.decode_problems(head_dims=HEAD_DIMS, q_lens=st.integers(1, 2), kv_lens=st.integers(1, 100),
                                  causal=(False,), device=DEVICE))
@example(problem=make_problem(batch=2, q_heads=16, kv_heads=2, q_len=1, kv_len=97, head_dim=64, mask="bool",
                              left_pad=(0, 70), dtype=torch.bfloat16, distribution="outlier_channels",
                              device=DEVICE))  # GQA 8, left padding past two int4 groups, outlier key channels
@example(problem=make_problem(batch=1, q_heads=8, kv_heads=2, q_len=2, kv_len=43, head_dim=33,
                              distribution="large_logits", seed=727, device=DEVICE))  # an fp32 output of 1e-68
def test_kernel_matches_float64_oracles(key, problem):
    check_scheme(key, problem)


@needs_kernel
@settings(max_examples=8)
@given(problem=kt.decode_problems(head_dims=HEAD_DIMS, q_lens=st.integers(1, 2), kv_lens=st.integers(1, 100),
                                  dtypes=(torch.bfloat16,), causal=(False,), device=DEVICE))
# a value scale per token spread over many powers of two (zero values: scales of 0), and logits that leave most
# weights far below fp16's normal range once scaled by the row's largest p * scale_v
@example(problem=make_problem(batch=1, q_heads=4, kv_heads=1, q_len=1, kv_len=70, head_dim=32, mask="bool",
                              dtype=torch.bfloat16, distribution="masked_rows", seed=7, device=DEVICE))
@example(problem=make_problem(batch=2, q_heads=8, kv_heads=2, q_len=2, kv_len=97, head_dim=64,
                              dtype=torch.bfloat16, distribution="large_logits", seed=11, device=DEVICE))
@example(problem=make_problem(batch=1, q_heads=4, kv_heads=1, q_len=1, kv_len=70, head_dim=33,
                              dtype=torch.bfloat16, distribution="zero_values", seed=7, device=DEVICE))
def test_fp8_under_a_bf16_query_takes_fp16_mmas(problem):
    """fp8 codes under a bf16 query: the split kernel's ``F16_CODES`` path (the query and the weights times value
    scales scaled per row by powers of two into fp16) against the float64 oracles, and that it was taken."""
    taken = []

    def spy(*args):
        taken.append(real(*args))
        return taken[-1]

    real = launcher.f16_codes
    with mock.patch.object(launcher, "f16_codes", spy):
        check_scheme("fp8", problem)
    assert taken and all(taken), "the fp16 path did not serve"


@needs_kernel
@pytest.mark.parametrize("key", ["8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunks", [[37], [30, 1, 6], [16, 284]])
def test_value_blocks_hold_zeros_past_the_length(key, dtype, chunks):
    """int8 / fp8 values in token blocks: the decode kernel reads the whole last block, and fp8 bytes past the length
    could be NaN (e4m3's 0x7F), which a weight of 0 does not cancel. Into sections filled with NaN bytes, appends
    (the append kernel on CUDA, the host path on the CPU) leave zeros past the length in the last block, and the
    kernel's output over them is that of a fresh pack (itself checked against the float64 oracles)."""
    length = sum(chunks)
    problem = make_problem(batch=2, q_heads=4, kv_heads=2, q_len=1, kv_len=length, head_dim=64, mask="bool",
                           left_pad=(0, 5), dtype=dtype, seed=length, device=DEVICE)
    scheme = SCHEMES[key]
    config = DecodeAttentionConfig(block_n=64, num_splits=3 if length > 128 else 1)
    clean = check_scheme(key, problem, config=config)
    state = pack(scheme, problem.k, problem.v, chunks, poison=0x7F)
    assert state["v"].dim() == 5, "values are not in token blocks"
    past = state["v"].view(torch.uint8)[:, :, -1, :, length % token_blocks.TOKENS:]
    assert past.numel() > 0 and not past.any(), "bytes past the length are not zero"
    out = kernel(scheme, state, length, config=config)(problem.q, problem.k, problem.v, problem.attn_mask)
    assert torch.equal(out, clean)


@needs_kernel
@pytest.mark.parametrize("key", QUANTIZED)
@pytest.mark.parametrize("distribution", ["one_dominant_key", "equal_scores", "outlier_channels", "zero_values",
                                          "masked_rows"])
def test_kernel_on_adversarial_data(key, distribution):
    mask = "bool" if distribution == "masked_rows" else "none"
    problem = make_problem(batch=1, q_heads=4, kv_heads=1, q_len=1, kv_len=70, head_dim=32, mask=mask,
                           dtype=torch.float16, distribution=distribution, seed=7, device=DEVICE)
    check_scheme(key, problem)


@pytest.mark.parametrize("key", QUANTIZED)
@settings(max_examples=6)
@given(problem=kt.attention_problems(head_dims=(16, 33), q_lens=(1,), kv_lens=st.integers(1, 100), causal=(False,),
                                     masks=("none",)), cuts=st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_appending_in_pieces_stores_what_one_append_stores(key, problem, cuts):
    # Token-by-token decode and chunked prefill must leave the same sections, byte for byte, as
    # quantizing everything at once (int4: groups completed across appends, residual carried).
    L, chunks = problem.kv_len, []
    for c in cuts:
        if sum(chunks) < L:
            chunks.append(min(c, L - sum(chunks)))
    if sum(chunks) < L:
        chunks.append(L - sum(chunks))
    scheme = SCHEMES[key]
    whole, pieces = pack(scheme, problem.k, problem.v), pack(scheme, problem.k, problem.v, chunks)
    for name in whole:
        if name == "v" and getattr(scheme, "blocked_values", False):  # the last block's tail is never written
            a, b = (token_blocks.read_rows(x[name], L) for x in (whole, pieces))
        else:
            a, b = whole[name], pieces[name]
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (name, chunks)


@pytest.mark.parametrize("key", QUANTIZED)
def test_cpu_reference_path_matches_the_dequantized_oracle(key):
    # What CI runs through the backend: dequantize this layer, torch SDPA.
    problem = make_problem(batch=2, q_heads=8, kv_heads=2, q_len=1, kv_len=45, head_dim=32, mask="additive",
                           left_pad=(3, 20), dtype=torch.float32, seed=2)
    scheme = SCHEMES[key]
    state = pack(scheme, problem.k, problem.v)
    kd, vd = scheme.dequantize(state, problem.kv_len, problem.dtype)

    def reference(q, k, v, attn_mask=None, scale=None, is_causal=False):
        return launch.decode_attention(scheme, q, state, problem.kv_len, attn_mask, scale)

    kt.check_kernel(reference, dataclasses.replace(problem, k=kd, v=vd))


@pytest.mark.parametrize("key", QUANTIZED)
def test_cache_is_smaller_than_the_16_bit_one(key):
    for dtype in (torch.bfloat16, torch.float16):
        held = layout_nbytes(SCHEMES[key].layout(1, 8, 4096, 128, 128, dtype))
        full = layout_nbytes(SCHEMES["16"].layout(1, 8, 4096, 128, 128, dtype))
        # bytes per token and head at D=128: int8/fp8 2 (128 + 4), int4 80 + 68, aligned 2 (192 + 4)
        expected = {"8": 264, "fp8": 264, "4": 148, "aligned": 392}[key] * 8 * 4096
        assert held == expected and held < full, (key, held, full)


def test_host_float8_codes_convert_as_torch_converts_them():
    """``codes_as_float`` (a lookup of the 256 e4m3 values on the host) equals ``.float()`` for every bit
    pattern, NaN where e4m3fn has NaN, in any shape."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    for shaped in (codes, codes.reshape(2, 4, 32), codes.reshape(16, 16)[:, ::3]):
        assert torch.equal(codes_as_float(shaped).nan_to_num(7.0), shaped.float().nan_to_num(7.0))
    ints = torch.arange(-128, 128, dtype=torch.int8)
    assert torch.equal(codes_as_float(ints), ints.float())
