"""The full-cache format's early-exit summaries (``lowering/formats/dense.py``): after any sequence of appends
through ``kvpass::cache_attention``, each block's key bounds and value norm contain the rows as attention
reads them (dequantized), for every scheme: int4's open group too, whose rows are read at full precision
until the group fills and as codes after."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowering.attention.early_exit import bound
from lowering.core import packed
from lowering.formats import FormatSpec, build_format
from lowering.formats.dense import _scheme_part


@settings(max_examples=25, deadline=None)
@given(kv_bits=st.sampled_from([4, 8, "fp8", "aligned", 16]), pieces=st.lists(st.integers(1, 40), min_size=2,
                                                                             max_size=8),
       seed=st.integers(0, 2 ** 16))
def test_summaries_contain_the_rows_attention_reads(kv_bits, pieces, seed):
    g = torch.Generator().manual_seed(seed)
    B, Hkv, D = 2, 2, 16
    spec = FormatSpec(kv_bits=kv_bits, early_exit=True).to_json()
    fmt = build_format(spec)
    past_k = past_v = torch.empty(0)
    length = 0
    for n in pieces:
        k, v = (torch.randn(B, Hkv, n, D, generator=g) * 3 for _ in range(2))
        q = torch.randn(B, Hkv, n, D, generator=g)
        _, kbuf, vbuf = torch.ops.kvpass.cache_attention(q, past_k, past_v, k, v, None, False, None, spec, "site")
        length += n
        state = packed.views(packed.whole_buffer(kbuf), fmt.layout(B, Hkv, length, D, D, q.dtype))
        rows_k, rows_v = fmt.storage.dequantize(_scheme_part(state), length, q.dtype)
        pad = bound.num_blocks(length) * bound.BLOCK - length
        kb = torch.nn.functional.pad(rows_k, (0, 0, 0, pad), value=float("nan")).view(B, Hkv, -1, bound.BLOCK, D)
        vn = torch.nn.functional.pad(rows_v.float().norm(dim=-1), (0, pad)).view(B, Hkv, -1, bound.BLOCK)
        real = ~kb.isnan()
        assert (state["ee_kmin"][:, :, :, None] <= kb)[real].all(), f"key below its block's min at {length} tokens"
        assert (state["ee_kmax"][:, :, :, None] >= kb)[real].all(), f"key above its block's max at {length} tokens"
        assert (state["ee_vmax"][..., None] >= vn).all(), f"value norm above its block's at {length} tokens"
        past_k, past_v = packed.slot_view(kbuf, (B, Hkv, length, D)), packed.slot_view(vbuf, (B, Hkv, length, D))
