"""Check your own attention kernel with kvpass.testing, in a few lines.

    python examples/check_my_kernel.py          # runs the checks below, prints what they found
    pytest examples/check_my_kernel.py          # the same, as pytest tests

``my_attention`` stands for your kernel: any function with torch SDPA's signature
``fn(q, k, v, attn_mask=None, scale=None, is_causal=False)``. Here it is a plain chunked torch
implementation; ``my_buggy_attention`` forgets the mask, and the harness says so, with the
smallest problem that shows it (paste that ``make_problem(...)`` into ``@example`` to pin it).
For a Triton kernel on a CPU, export TRITON_INTERPRET=1 before starting Python.
"""
import math

import torch
from hypothesis import example, given, settings

import kvpass.testing as kt

if __name__ == "__main__":
    kt.load_profile()  # before the decorators below; under pytest the kvpass_testing plugin does it


def my_attention(q, k, v, attn_mask=None, scale=None, is_causal=False):
    """Two-pass chunked attention in fp32: scores, softmax, values. GQA by repeating K/V heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q.float() @ k.transpose(-1, -2) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask.float()
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), -math.inf)
    m = s.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0)  # rows with no key: 0, not NaN
    p = torch.exp(s - m)
    out = (p.to(v.dtype if q.dtype == torch.float32 else q.dtype).float() @ v)
    return (out / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)).to(q.dtype)


def my_buggy_attention(q, k, v, attn_mask=None, scale=None, is_causal=False):
    return my_attention(q, k, v, attn_mask=None, scale=scale, is_causal=is_causal)  # forgets the mask


# 1. The whole input space: all dtypes, GQA/MQA, masks, padding, adversarial data.
@given(kt.attention_problems())
def test_my_attention(problem):
    kt.check_kernel(my_attention, problem)


# 2. Only what a decode kernel claims: a few queries, its head dims, half precision; a pinned example.
@given(kt.decode_problems(head_dims=(64, 128), dtypes=(torch.float16, torch.bfloat16)))
@example(kt.make_problem(batch=1, q_heads=8, kv_heads=1, q_len=1, kv_len=17, head_dim=64, dtype=torch.float16,
                         mask="bool", left_pad=(16,)))
def test_my_attention_decode(problem):
    kt.check_kernel(my_attention, problem)


@settings(max_examples=50, database=None)
@given(kt.attention_problems(masks=("bool", "additive")))
def check_my_buggy_attention(problem):
    kt.check_kernel(my_buggy_attention, problem)


if __name__ == "__main__":
    test_my_attention()
    test_my_attention_decode()
    print("my_attention: passed")
    try:
        check_my_buggy_attention()
    except AssertionError as failure:
        notes = "\n".join(getattr(failure, "__notes__", []))
        print(f"my_buggy_attention: the harness reports\n{failure}\n{notes}")
    else:
        raise SystemExit("the harness missed the forgotten mask")
