"""The capacity grid of buffers that grow in place (``lowering.core.packed``)."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowering.core import packed
from lowering.storage import SCHEMES


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 1 << 20), st.data())
def test_capacity_is_stable_up_to_itself_and_has_little_slack(length, data):
    cap = packed.capacity(length)
    assert cap >= length and cap % packed.MIN_CAPACITY_STEP == 0
    assert cap - length < max(packed.MIN_CAPACITY_STEP, length / 32), (length, cap)  # slack < 1/32 (or a step)
    later = data.draw(st.integers(length, cap))
    assert packed.capacity(later) == cap  # a buffer of `length` serves every length up to its capacity


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(SCHEMES)), st.integers(1, 300), st.integers(1, 4), st.integers(1, 3))
def test_every_length_lies_in_its_capacity_as_prefixes(key, length, batch, heads):
    scheme = SCHEMES[key]
    layout_of = lambda n: scheme.layout(batch, heads, n, 16, 16, torch.bfloat16)  # noqa: E731
    cap_layout = packed.capacity_layout(layout_of, packed.capacity(length))
    buffer, sections = packed.allocate(cap_layout, "cpu")
    views = packed.trimmed(sections, layout_of(length))
    for name, (shape, dtype) in layout_of(length).items():
        assert views[name].shape == shape and views[name].dtype == dtype
        # a prefix: the view's first element is the capacity section's, and it lies inside the buffer
        assert views[name].numel() == 0 or views[name].data_ptr() == sections[name].data_ptr()
    assert buffer.numel() >= packed.layout_nbytes(layout_of(length))
