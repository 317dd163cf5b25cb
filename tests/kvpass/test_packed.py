"""Packed caches through real HF models: every registered storage scheme and cache format, end to end.

What the backend owes for a packed variant, whatever the scheme: the model's cache holds slots whose
bytes are the packed buffer (memory measured from the tensors held), the sequence length reads right,
outputs stay within the scheme's quantization error of eager (exactly eager where nothing is lost), the
compile count does not grow with tokens, and sites it cannot rewrite run the exact attention with the
reason in the report. Schemes and formats are read from their registries, so a new one is covered here
by registering it. Scheme-level accuracy (kernels vs float64) lives in tests/lowering/.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpass
import zoo
from lowering.core import stats
from lowering.core.packed import capacity, capacity_layout, is_slot, layout_nbytes
from lowering.formats import FORMATS
from lowering.formats.budgeted import per_token
from lowering.storage import SCHEMES

QUANTIZED = [k for k in SCHEMES if k != "16"]
POLICIES = [p for p in FORMATS if p != "full"]

# Relative logit error allowed per scheme: 8 x the scheme's relative rounding step. Each cached element
# carries at most half a step of its row's (or group's) range; through softmax, the value sum and two
# tiny layers that stays within a few steps (measured for int8: 0.13% on gpt2, 0.38% on llama = 0.5 step), so 8 steps
# fails only on a real fault (a wrong scale, a lost token, a misplaced row: errors of order 100%).
RELATIVE_STEP = {"8": 1 / 127, "4": 1 / 7.5, "fp8": 1 / 16, "aligned": 1 / 127}


def _options(kv_bits, **extra):
    bits = int(kv_bits) if kv_bits.isdigit() else kv_bits
    return {"kv_bits": bits, "compiler": "eager", **extra}


def teacher_forced_logits(model, ids, mask, continuation):
    """Last-position logits [B, 1 + T, V] of a prefill then T single-token steps fed ``continuation``,
    and the cache at the end."""
    out = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True)
    logits = [out.logits[:, -1]]
    for t in range(continuation.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=continuation[:, t:t + 1], attention_mask=mask, past_key_values=out.past_key_values,
                    use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), out.past_key_values


def _run(options, name="llama", batch=3, steps=5, left_padding=True):
    eager, compiled = zoo.build(name), zoo.build(name)
    ids, mask = zoo.prompt(batch, left_padding=left_padding)
    continuation = torch.randint(1, zoo.VOCAB, (batch, steps), generator=torch.Generator().manual_seed(3)).to(ids)
    with torch.no_grad():
        ref, ref_cache = teacher_forced_logits(eager, ids, mask, continuation)
        compiled.forward = torch.compile(compiled.forward, backend="kvpass", options=options)
        got, cache = teacher_forced_logits(compiled, ids, mask, continuation)
    assert not got.isnan().any()
    return ref, got, ref_cache, cache


def _relative_error(got, ref):
    return ((got.double() - ref.double()).norm(dim=-1) / ref.double().norm(dim=-1)).max().item()


@pytest.mark.parametrize("kv_bits", QUANTIZED)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_quantized_cache_within_scheme_error_of_eager(kv_bits, name):
    ref, got, _, _ = _run(_options(kv_bits), name=name)
    err = _relative_error(got, ref)
    assert err <= 8 * RELATIVE_STEP[kv_bits], f"relative logit error {err:.4f} for kv_bits={kv_bits} on {name}"
    assert all(s.status == "rewritten" and s.variant == "packed" for s in kvpass.report().sites), str(kvpass.report())


@pytest.mark.parametrize("kv_bits", QUANTIZED)
def test_cache_holds_the_packed_bytes_and_the_right_length(kv_bits):
    # 9 + 40 tokens: past int4's first full 32-token group (shorter caches are all residual window).
    _, _, ref_cache, cache = _run(_options(kv_bits), steps=40)
    assert cache.get_seq_length() == ref_cache.get_seq_length()
    scheme = SCHEMES[kv_bits]
    for ref_layer, layer in zip(ref_cache.layers, cache.layers):
        assert is_slot(layer.keys) and is_slot(layer.values)
        b, h, length, d = ref_layer.keys.shape
        held = layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
        full = ref_layer.keys.untyped_storage().nbytes() + ref_layer.values.untyped_storage().nbytes()
        # Dense formats hold their capacity: the grid point at or above the length (< 1/32 more, or 64 tokens)
        expected = layout_nbytes(capacity_layout(lambda n: scheme.layout(b, h, n, d, d, ref_layer.keys.dtype),
                                                 capacity(length)))
        assert held == expected + 1, (held, expected)  # + the values slot's one byte
        assert held < full, f"kv_bits={kv_bits} holds {held} bytes, the full-precision cache {full}"


def _step(model, cache, token, mask):
    return model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("kv_bits", QUANTIZED)
def test_decode_appends_in_place_and_a_reused_prefix_is_copied(kv_bits):
    """Decode steps write into the buffer's spare capacity (the buffer stays put); two continuations of one
    prefix (the second starting from slots whose buffer the first grew) each see only their own tokens."""
    model = zoo.build("llama")
    ids, mask = zoo.prompt(2, left_padding=True)
    g = torch.Generator().manual_seed(5)
    branch_a, branch_b = (torch.randint(1, zoo.VOCAB, (2, 3), generator=g).to(ids) for _ in range(2))
    model.forward = torch.compile(model.forward, backend="kvpass", options=_options(kv_bits))

    def continue_from(cache, tokens, m):
        logits = []
        for t in range(tokens.shape[1]):
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
            logits.append(_step(model, cache, tokens[:, t:t + 1], m))
        return torch.stack(logits, 1), m

    def prefill():
        cache = DynamicCache()
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        return cache

    with torch.no_grad():
        cache = prefill()
        prefix = [(layer.keys, layer.values) for layer in cache.layers]
        before = [layer.keys.untyped_storage().data_ptr() for layer in cache.layers]
        got_a, mask_a = continue_from(cache, branch_a, mask)
        assert [layer.keys.untyped_storage().data_ptr() for layer in cache.layers] == before  # grown in place
        branch_a_slots = [(layer.keys, layer.values) for layer in cache.layers]
        for layer, (k, v) in zip(cache.layers, prefix):  # back to the prefix, as a cache reused for a new prompt
            layer.keys, layer.values = k, v
        got_b, _ = continue_from(cache, branch_b, mask)
        for layer, (k, v) in zip(cache.layers, branch_a_slots):  # and branch A goes on, one more token
            layer.keys, layer.values = k, v
        got_a_more, _ = continue_from(cache, branch_b[:, :1], mask_a)

        fresh_cache = prefill()
        fresh_a, fresh_mask_a = continue_from(fresh_cache, branch_a, mask)
        fresh_a_more, _ = continue_from(fresh_cache, branch_b[:, :1], fresh_mask_a)
        fresh_b, _ = continue_from(prefill(), branch_b, mask)
    assert torch.equal(got_a, fresh_a)
    assert torch.equal(got_b, fresh_b)
    assert torch.equal(got_a_more, fresh_a_more)


def test_quantized_cache_through_inductor_compiles_a_bounded_number_of_graphs():
    options = _options(QUANTIZED[0], compiler="inductor")
    ref, got, _, cache = _run(options, steps=4)
    assert _relative_error(got, ref) <= 8 * RELATIVE_STEP[QUANTIZED[0]]
    assert all(is_slot(layer.keys) for layer in cache.layers)
    assert kvpass.counters["graphs"] <= 3, str(kvpass.report())  # prefill, first decode, dynamic-length decode


def test_generate_with_a_quantized_cache():
    model = zoo.build("qwen2")
    ids, mask = zoo.prompt(2, left_padding=True)
    model.forward = torch.compile(model.forward, backend="kvpass", options=_options(QUANTIZED[0]))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (2, ids.shape[1] + 6)
    assert out.past_key_values.get_seq_length() == ids.shape[1] + 5  # the last token is not fed back
    assert kvpass.stats()["sites"], kvpass.stats()


def test_static_cache_falls_back_to_exact_with_the_reason():
    eager, compiled = zoo.build("llama"), zoo.build("llama")
    ids, mask = zoo.prompt(1)
    compiled.forward = torch.compile(compiled.forward, backend="kvpass", options=_options(QUANTIZED[0]))
    with torch.no_grad():
        ref = eager.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation="static")
        got = compiled.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                cache_implementation="static")
    assert torch.equal(ref, got)
    sites = kvpass.report().sites
    assert sites and all("FALLBACK to exact" in s.lowering and "static_cache_index_copy" in s.lowering for s in sites)


def test_full_precision_cache_from_an_uncompiled_prefill_is_converted():
    eager, compiled = zoo.build("llama"), zoo.build("llama")
    compiled.load_state_dict(eager.state_dict())
    ids, mask = zoo.prompt(2)
    step = torch.compile(compiled.forward, backend="kvpass", options=_options(QUANTIZED[0]))
    nxt = torch.tensor([[5], [7]], device=zoo.DEVICE)
    mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    with torch.no_grad():
        ref_cache = eager(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache()).past_key_values
        ref = eager(input_ids=nxt, attention_mask=mask2, past_key_values=ref_cache).logits
        cache = compiled(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache()).past_key_values
        got = step(input_ids=nxt, attention_mask=mask2, past_key_values=cache)
    assert is_slot(got.past_key_values.layers[0].keys)
    assert _relative_error(got.logits[:, -1], ref[:, -1]) <= 8 * RELATIVE_STEP[QUANTIZED[0]]


def test_a_copied_slot_raises_instead_of_reading_garbage():
    """Beam search reorders caches with index_select, which materialises the slot: refuse it loudly."""
    model = zoo.build("llama")
    ids, mask = zoo.prompt(2)
    model.forward = torch.compile(model.forward, backend="kvpass", options=_options(QUANTIZED[0]))
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache()).past_key_values
        cache.batch_select_indices(torch.tensor([1, 0], device=zoo.DEVICE))
        with pytest.raises(Exception, match="not a kvpass packed slot"):
            model(input_ids=torch.tensor([[5], [7]], device=zoo.DEVICE),
                  attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=cache)


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_with_budget_above_length_equals_the_full_cache(policy):
    ref, got, _, _ = _run({"policy": policy, "budget": 4096, "compiler": "eager"})
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# Schemes a token policy can store: per-token ones, and those with a per-token form (int4's rows).
PER_TOKEN_QUANTIZED = [k for k in QUANTIZED if per_token(SCHEMES[k]) or getattr(SCHEMES[k], "per_token_variant", None)]


@pytest.mark.parametrize("kv_bits", PER_TOKEN_QUANTIZED)
def test_a_policy_over_a_quantized_scheme_is_within_its_error_when_nothing_is_dropped(kv_bits):
    ref, got, _, _ = _run(_options(kv_bits, policy="adore", budget=4096), steps=3)
    assert _relative_error(got, ref) <= 8 * RELATIVE_STEP[kv_bits]


@pytest.mark.parametrize("kv_bits", PER_TOKEN_QUANTIZED)
@pytest.mark.parametrize("policy", POLICIES)
def test_policies_compose_with_every_per_token_scheme(policy, kv_bits):
    """Kept tokens stored quantized, at a budget of 6: the cache holds the budget's share (codes moved by
    index, fp8's as bytes), the length reads right and nothing is NaN."""
    _, got, ref_cache, cache = _run(_options(kv_bits, policy=policy, budget=6), steps=4)
    assert not got.isnan().any() and cache.get_seq_length() == ref_cache.get_seq_length()
    layer, ref_layer = cache.layers[0], ref_cache.layers[0]
    full_tokens = ref_layer.keys.untyped_storage().nbytes() + ref_layer.values.untyped_storage().nbytes()
    assert layer.keys.untyped_storage().nbytes() < full_tokens * 6 / ref_layer.keys.shape[2] * 2 + 4096


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_cache_holds_at_most_its_budget(policy):
    budget = 6
    _, got, ref_cache, cache = _run({"policy": policy, "budget": budget, "compiler": "eager"}, steps=6)
    assert cache.get_seq_length() == ref_cache.get_seq_length()  # logical length: RoPE positions stay right
    for ref_layer, layer in zip(ref_cache.layers, cache.layers):
        b, h, length, d = ref_layer.keys.shape
        held = layer.keys.untyped_storage().nbytes()
        full_tokens = ref_layer.keys.untyped_storage().nbytes() + ref_layer.values.untyped_storage().nbytes()
        # The budget's share of the full cache, with room for the format's stated per-token overhead.
        assert held < full_tokens * budget / length * 2 + 4096, (policy, held, full_tokens)


def test_a_batch_of_one_keeps_its_packed_cache():
    """Regression: a slot with B=1 has stride 1 on its size-1 batch dim and is still a slot."""
    ref, got, _, cache = _run(_options(QUANTIZED[0]), batch=1, left_padding=False, steps=3)
    assert all(is_slot(layer.keys) for layer in cache.layers)
    assert _relative_error(got, ref) <= 8 * RELATIVE_STEP[QUANTIZED[0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the in-place decode fast path runs on CUDA only")
@pytest.mark.parametrize("kv_bits", QUANTIZED)
def test_cuda_decode_steps_stay_in_their_buffer_and_within_the_scheme_error(kv_bits):
    """On CUDA (kernels compiled, int8's fused in-place decode step): 40 teacher-forced steps in bf16 stay
    within the scheme's error of eager (+0.02 for bf16 logits), and int8's steps after the first take
    the in-place path (the prompt's capacity of 64 holds all 40), int4's all but those filling a group."""
    eager, compiled = (zoo.build("llama").cuda().to(torch.bfloat16) for _ in range(2))
    ids, mask = (t.cuda() for t in zoo.prompt(3, left_padding=True))
    continuation = torch.randint(1, zoo.VOCAB, (3, 40), generator=torch.Generator().manual_seed(3)).cuda()
    compiled.forward = torch.compile(compiled.forward, backend="kvpass",
                                     options=_options(kv_bits, compiler="inductor"))
    stats.calls.clear()
    with torch.no_grad():
        ref, _ = teacher_forced_logits(eager, ids, mask, continuation)
        got, cache = teacher_forced_logits(compiled, ids, mask, continuation)
    assert not got.isnan().any()
    assert _relative_error(got.float(), ref.float()) <= 8 * RELATIVE_STEP[kv_bits] + 0.02  # + bf16 logits
    if kv_bits == "8":
        assert stats.calls["packed_decode_in_place"] >= 39 * len(cache.layers), dict(stats.calls)
    if kv_bits == "4":  # in place but for the (at most 2 of 40) steps that fill a 32-token key group
        assert stats.calls["packed_decode_in_place"] >= (39 - 2) * len(cache.layers), dict(stats.calls)


def test_cuda_graph_modes_are_not_applied_to_packed_graphs_and_the_report_says_why():
    _, got, _, cache = _run(_options(QUANTIZED[0], mode="reduce-overhead"), steps=2)
    assert all(is_slot(layer.keys) for layer in cache.layers)
    sites = kvpass.report().sites
    assert sites and all("mode='reduce-overhead' not applied" in s.reason for s in sites), str(kvpass.report())


@pytest.mark.parametrize("kv_bits", QUANTIZED)
def test_a_deep_copied_prompt_cache_serves_two_continuations(kv_bits):
    """HF's prefix-caching recipe (``copy.deepcopy(prompt_cache)`` per new request): each copy holds the
    whole packed buffer and continues as the original would."""
    import copy

    model = zoo.build("llama")
    ids, mask = zoo.prompt(2, left_padding=True)
    tokens = torch.randint(1, zoo.VOCAB, (2, 3), generator=torch.Generator().manual_seed(8)).to(ids)
    model.forward = torch.compile(model.forward, backend="kvpass", options=_options(kv_bits))

    def run(cache):
        m, logits = mask, []
        for t in range(tokens.shape[1]):
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
            logits.append(_step(model, cache, tokens[:, t:t + 1], m))
        return torch.stack(logits, 1)

    with torch.no_grad():
        prompt_cache = DynamicCache()
        model(input_ids=ids, attention_mask=mask, past_key_values=prompt_cache, use_cache=True)
        first, second = copy.deepcopy(prompt_cache), copy.deepcopy(prompt_cache)
        assert all(is_slot(layer.keys) for layer in first.layers)
        got_first, got_second, got_original = run(first), run(second), run(prompt_cache)
    assert torch.equal(got_first, got_original) and torch.equal(got_second, got_original)


@pytest.mark.parametrize("kv_bits", ["16", "8"])
@pytest.mark.parametrize("policy", ["streaming", "snapkv", "asl"])
def test_in_place_policy_steps_give_the_general_steps_logits(policy, kv_bits):
    """Through an HF model with left padding: decode steps that replace the evicted slot in place
    (``lowering/formats/slot_replacement.py``, forced on for the CPU) give the general step's logits. Both attend over
    the same kept rows (tests/lowering/formats/test_slot_replacement.py checks them bit for bit), in another order, so
    at 16 bits only fp32 reassociation separates them: 1e-5 relative, against errors of order 1 for a wrong token.
    Quantized, that 1e-7 move of a layer's output can round a later layer's new row to the neighbouring code (seen:
    equal codes, scales apart in the last bit, then 1.6e-4 in the logits), so the scheme's own allowance applies."""
    runs = {}
    for in_place in (False, True):
        before = stats.calls["policy_replace_in_place"]
        runs[in_place] = _run(_options(kv_bits, policy=policy, budget=6, replace_in_place=in_place), steps=5)[1]
        served = stats.calls["policy_replace_in_place"] - before
        assert (served > 0) == in_place, f"in-place steps: {served}"
    assert _relative_error(runs[True], runs[False]) <= (1e-5 if kv_bits == "16" else 8 * RELATIVE_STEP[kv_bits])
