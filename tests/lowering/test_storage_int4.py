"""int4 (KIVI) specifics: the residual window's boundary, in the layout and in the fused kernel.

The layout is a pure function of the length: length // 32 full key groups, length % 32 residual tokens
in full precision. Kernel checks are those of test_storage_schemes.check_scheme (exact-kernel tolerance
over the dequantized cache, step bound vs the unquantized cache).
"""
import pytest
import torch

from kvpass.testing import make_problem
from lowering.storage import SCHEMES
from test_storage_schemes import DEVICE, check_scheme, needs_kernel, pack

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
G = SCHEMES["4"].group


@pytest.mark.parametrize("length", [1, G - 1, G, G + 1, 2 * G - 1, 2 * G, 3 * G + 5])
def test_layout_is_full_groups_plus_residual(length):
    layout = SCHEMES["4"].layout(2, 3, length, 64, 64, torch.bfloat16)
    quant, res = length // G * G, length % G
    assert layout["k"][0] == (2, 3, quant, 32) and layout["k_scale"][0] == (2, 3, quant // G, 64)
    assert layout["v_scale"][0] == (2, 3, quant) and layout["k_res"][0] == (2, 3, res, 64)
    assert layout["k_res"][1] == torch.bfloat16  # the residual window is held in the model's dtype


def test_residual_tokens_are_stored_exactly_and_a_filled_group_is_quantized():
    k, v = torch.randn(1, 2, G + 3, 16), torch.randn(1, 2, G + 3, 16)
    state = pack(SCHEMES["4"], k[:, :, :G - 1], v[:, :, :G - 1])
    assert torch.equal(state["k_res"], k[:, :, :G - 1]) and state["k"].shape[2] == 0
    state = pack(SCHEMES["4"], k, v, chunks=[G - 1, 1, 3])  # the 32nd token fills the group
    assert state["k"].shape[2] == G and torch.equal(state["k_res"], k[:, :, G:])
    kd, _ = SCHEMES["4"].dequantize(state, G + 3, torch.float32)
    assert torch.equal(kd[:, :, G:], k[:, :, G:]) and not torch.equal(kd[:, :, :G], k[:, :, :G])


@needs_kernel
@pytest.mark.parametrize("length", [1, G - 1, G, G + 1, 2 * G - 1, 3 * G + 5])
@pytest.mark.parametrize("chunks", ["one append", "token by token"])
def test_kernel_across_the_residual_boundary(length, chunks):
    problem = make_problem(batch=2, q_heads=8, kv_heads=2, q_len=1, kv_len=length, head_dim=64, mask="bool",
                           left_pad=(0, length // 2), dtype=torch.float16, distribution="outlier_channels",
                           seed=length, device=DEVICE)
    check_scheme("4", problem, chunks=[1] * length if chunks == "token by token" else None)
