from fractions import Fraction

import pytest
import torch

from taskprune.plan import PlanError, make_plan, pruned_count


@pytest.mark.parametrize("d_ff", [1536, 4864, 8960, 18944, 11008, 14336])
@pytest.mark.parametrize("pct", [5, 10, 15, 20, 25, 30, 35])
def test_kept_width_is_aligned_and_minimal(d_ff, pct):
    ratio = pct / 100
    k = pruned_count(d_ff, ratio)
    need = Fraction(pct, 100) * d_ff
    assert (d_ff - k) % 128 == 0
    assert k % 128 == 0
    assert k >= need  # at least the ratio
    assert k - 128 < need  # and the smallest such multiple


def test_exact_arithmetic():
    assert pruned_count(8960, 0.1) == 896
    assert 0.28 * 3200 > 896  # the float trap exact arithmetic avoids
    assert pruned_count(3200, 0.28) == 896
    assert pruned_count(18944, 0.05) == 1024  # 947.2 -> 1024
    assert pruned_count(4864, 0.05) == 256  # 243.2 -> two blocks
    assert pruned_count(4864, 0.02) == 128
    assert pruned_count(256, 0.25, align=16) == 64


def test_unaligned_d_ff_keeps_aligned_width():
    k = pruned_count(1000, 0.1, align=128)
    assert (1000 - k) % 128 == 0 and k >= 100


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, 0.99])
def test_bad_ratio(ratio):
    with pytest.raises(PlanError):
        pruned_count(4864, ratio)


def test_ratio_leaving_less_than_one_block():
    with pytest.raises(PlanError, match="fewer than one block"):
        pruned_count(256, 0.6, align=128)


def test_selective_and_reverse_pick_extremes():
    scores = torch.tensor([[5.0, 1.0, 3.0, 0.0, 4.0, 2.0, 7.0, 6.0]] * 2)
    sel = make_plan(scores, "selective", 0.25, align=2)
    rev = make_plan(scores, "reverse", 0.25, align=2)
    assert sel.keep == [[0, 2, 4, 5, 6, 7]] * 2  # lowest two (idx 3, 1) removed
    assert rev.keep == [[0, 1, 2, 3, 4, 5]] * 2  # highest two (idx 6, 7) removed
    assert sel.n_pruned == 2 and sel.exact_ratio == 0.25 and sel.kept_width == 6


def test_ties_are_stable():
    plan = make_plan(torch.zeros(1, 8), "selective", 0.25, align=2)
    assert plan.keep == [[2, 3, 4, 5, 6, 7]]


def test_random_is_seeded_and_uniform():
    a = make_plan(None, "random", 0.3, align=4, seed=42, shape=(3, 64))
    b = make_plan(None, "random", 0.3, align=4, seed=42, shape=(3, 64))
    c = make_plan(None, "random", 0.3, align=4, seed=33, shape=(3, 64))
    assert a.keep == b.keep and a.keep != c.keep
    assert all(len(k) == a.kept_width and k == sorted(k) for k in a.keep)
    assert a.keep[0] != a.keep[1]  # each layer its own draw
    with pytest.raises(PlanError):
        make_plan(None, "random", 0.3, align=4, seed=None, shape=(3, 64))


def test_unknown_strategy():
    with pytest.raises(PlanError, match="unknown strategy"):
        make_plan(torch.zeros(1, 8), "greedy", 0.25, align=2)
