"""A check shared by the engine tests: an engine's top-k lists against a reference engine's full distribution."""

from __future__ import annotations

import pytest


def assert_topk_matches(got, reference, given, k: int, tol: float = 2e-3) -> None:
    """`got` (TokenTopK per answer) lists, at each position, k tokens most likely first whose
    figures are the reference engine's full-vocabulary ones (`reference`: TokenTopK with every
    token), no better token left out (the k-th figure is the reference's k-th), and the given
    tokens' figures beside them."""
    for g, r, ids in zip(got, reference, given, strict=True):
        assert g.logprobs == pytest.approx(r.logprobs, abs=tol) and len(g.ids) == len(g.top) == len(ids)
        for row, vals, ref_ids, ref_vals in zip(g.ids, g.top, r.ids, r.top):
            full = dict(zip(ref_ids, ref_vals))
            assert len(row) == len(set(row)) == k and vals == sorted(vals, reverse=True)
            assert vals == pytest.approx([full[t] for t in row], abs=tol)
            assert vals[-1] == pytest.approx(ref_vals[k - 1], abs=tol)
