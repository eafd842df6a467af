"""ChainRule.row_terms: which inputs' terms a backend may evaluate on (b, t, h, p) rows."""
import ssmc.ops
from ssmc.backends.chain_rule import DV, GOUT, ChainRule
from ssmc.ops.gla import build as build_gla


def test_ssd_row_terms_cover_the_row_inputs_only():
    terms = ChainRule(ssmc.ops.mamba2.program).row_terms
    # B and C (groups, n) and A (only in the decay) stay with the general chain rule
    assert set(terms) == {"x", "dt", "z", "D"}
    assert GOUT in terms["z"].free_symbols and DV not in terms["z"].free_symbols
    assert DV in terms["dt"].free_symbols and GOUT not in terms["dt"].free_symbols
    assert {DV, GOUT} <= terms["x"].free_symbols


def test_inputs_with_n_have_no_row_terms():
    # gla's q, k and g carry n; only v lives on rows
    assert set(ChainRule(build_gla(0.5).program).row_terms) == {"v"}
