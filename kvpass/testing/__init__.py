"""kvpass.testing: property-based checks of attention kernels against float64 references.

    from hypothesis import given
    import kvpass.testing as kt

    @given(kt.attention_problems(head_dims=(64, 128)))
    def test_my_kernel(problem):
        kt.check_kernel(my_attention, problem)

Strategies draw problems (shapes, GQA/MQA, dtypes, masks, padding, adversarial data); oracles
compute float64 references for exact attention and each kvpass variant; the tolerance model says
how far a correct kernel may be; the checks fail on NaN/inf, unwritten elements and errors past the
tolerance with messages that say where. See README_SECTION.md.
"""
from kvpass.testing.checks import assert_all_written, assert_attention_close, check_kernel, poisoned_like
from kvpass.testing.data import DISTRIBUTIONS
from kvpass.testing.oracles import (
    early_exit_bound_holds,
    kept_set_attention,
    logit_bias,
    quantized_attention,
    reference_attention,
    reference_probs,
    reference_scores,
)
from kvpass.testing.problems import AttentionProblem, ProblemSpec, make_problem
from kvpass.testing.profiles import load_profile, profile_name
from kvpass.testing.strategies import attention_problems, decode_problems, default_device, prefill_problems
from kvpass.testing.tolerance import (
    Tolerance,
    attention_tolerance,
    register_tolerance,
    registered_variants,
    tolerance_for,
)

__all__ = [
    "AttentionProblem", "ProblemSpec", "make_problem", "DISTRIBUTIONS",
    "attention_problems", "decode_problems", "prefill_problems", "default_device",
    "reference_attention", "reference_scores", "reference_probs", "logit_bias",
    "kept_set_attention", "quantized_attention", "early_exit_bound_holds",
    "Tolerance", "attention_tolerance", "tolerance_for", "register_tolerance", "registered_variants",
    "poisoned_like", "assert_all_written", "assert_attention_close", "check_kernel",
    "load_profile", "profile_name",
]
