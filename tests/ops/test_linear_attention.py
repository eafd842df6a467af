"""`ssmc.ops.linear_attention` (causal, no decay) against a float64 loop and the closed form."""
import pytest
import torch

from ssmc.ops import linear_attention
from tests.helpers import (SHAPES, check_against_reference, cu_seqlens, linear_attention_inputs,
                           random_state)
from tests.ops.naive import REF, check_matches_naive, check_varlen_per_sequence, close, naive_loop

TOL32 = 1e-5   # float32 op against the float64 reference (outputs and gradients)


def naive_linear_attention(q, k, v, scale=None, initial_state=None):
    """S_t = S_{t-1} + k_t^T v_t;  o_t = (scale q_t) S_t; scale = n^-0.5."""
    return naive_loop(q, k, v, lambda S, i: S, scale, initial_state)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"t{s['t']}")
@pytest.mark.parametrize("scale", [None, 1.5])
def test_linear_attention_matches_naive(shape, scale):
    check_matches_naive(linear_attention, linear_attention_inputs, naive_linear_attention, shape,
                        scale)


def test_linear_attention_is_causal_masked_attention():
    torch.manual_seed(0)
    x = linear_attention_inputs(2, 10, 3, 4, 5, dtype=torch.float64, seed=3)
    scores = torch.einsum("bthn,bshn->bhts", x["q"] * 0.5, x["k"]).tril()
    close("y", linear_attention(**x, **REF), torch.einsum("bhts,bshp->bthp", scores, x["v"]))


def test_linear_attention_varlen_matches_naive_per_sequence():
    torch.manual_seed(0)
    lengths = [1, 0, 9, 4]
    x = linear_attention_inputs(1, sum(lengths), 2, 3, 4, dtype=torch.float64, seed=4)
    h0 = random_state(4, 2, 3, 4, dtype=torch.float64, seed=5)
    cu = cu_seqlens(lengths)
    check_varlen_per_sequence(linear_attention, naive_linear_attention, x, h0, cu)


def test_linear_attention_float32_against_reference_with_grads():
    torch.manual_seed(0)
    x = linear_attention_inputs(2, 7, 3, 4, 5, seed=6)
    check_against_reference(linear_attention, x, tol=TOL32, initial_state=random_state(
        2, 3, 4, 5, seed=7), return_final_state=True, **REF)
