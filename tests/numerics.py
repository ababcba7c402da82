"""Comparing floating-point results that were computed along different paths.

A matrix product's last bits depend on its shape (one user or a batch, a block of 3 rows
or all of them), the thread count and the BLAS kernel the processor picked (OpenBLAS's
Haswell, Zen, SkylakeX ... kernels round differently). So results computed through
different shapes are compared to a tolerance, and rankings are compared in a way that
cannot flip on a last-bit difference: two items may trade places only where their
scores are tied to that tolerance.

Where rayline promises bit-identical answers (ALS factors across worker counts, the
sharded replay's draws, resume), the tests stay exact: those paths run the same
operations on the same shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FLOAT64_RESHAPED = 1e-12
"""Absolute tolerance for float64 scores of order 1-10 through products of different
shapes: a dot product of a few dozen terms reassociated differently is off by a few ulps
(~1e-15 each), far under this; a real defect is off by orders of magnitude more."""


def assert_same_ranking(
    got_items: Sequence,
    got_scores: Sequence[float],
    want_items: Sequence,
    want_scores: Sequence[float],
    atol: float,
    context: object = "",
) -> None:
    """Two best-first top-k lists are the same ranking up to scores tied within `atol`.

    The scores must agree position by position; every item both lists hold has the same
    score in each; an item in only one list is one tied (within `atol`) with the last
    score kept, so it lost or won the cut on a rounding. Equal lists pass at once."""
    got_scores = np.asarray(got_scores, dtype=np.float64)
    want_scores = np.asarray(want_scores, dtype=np.float64)
    assert len(got_items) == len(want_items), (context, got_items, want_items)
    np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=atol, err_msg=str(context))
    got = dict(zip(list(got_items), got_scores.tolist()))
    want = dict(zip(list(want_items), want_scores.tolist()))
    assert len(got) == len(got_items), (context, "an item twice", got_items)
    for item in got.keys() & want.keys():
        assert abs(got[item] - want[item]) <= atol, (context, item, got[item], want[item])
    cut = float(want_scores[-1]) if len(want_scores) else 0.0
    for item in got.keys() ^ want.keys():
        score = got.get(item, want.get(item))
        assert abs(score - cut) <= atol, (context, "not a tie at the cut", item, score, cut)


def assert_same_rankings(got_items, got_scores, want_items, want_scores, atol, context=""):
    """`assert_same_ranking` row by row of (users, k) arrays."""
    assert np.shape(got_items) == np.shape(want_items), (context, np.shape(got_items))
    for row, parts in enumerate(zip(got_items, got_scores, want_items, want_scores)):
        assert_same_ranking(*(list(p) for p in parts), atol=atol, context=(context, row))
