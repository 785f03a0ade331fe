"""The over-seeds table's math: time to a target loss, mean and spread, the headline check."""

from __future__ import annotations

import math

import pytest

from hsplitlora.experiment_table import LossCurve, headline, mean_spread, time_to_loss


def test_time_to_loss_interpolates_between_evaluations_and_says_never():
    curve = LossCurve([10.0, 20.0, 30.0], [2.0, 1.5, 1.0])
    assert time_to_loss(curve, 1.75) == pytest.approx(15.0)  # halfway down 2.0 -> 1.5
    assert time_to_loss(curve, 1.2) == pytest.approx(20.0 + 10.0 * 0.3 / 0.5)
    assert time_to_loss(curve, 1.0) == pytest.approx(30.0)
    assert time_to_loss(curve, 2.5) == 10.0  # already below at the first evaluation
    assert time_to_loss(curve, 0.9) is None


def test_mean_spread_is_the_sample_standard_deviation_of_what_exists():
    mean, spread, n = mean_spread([1.0, 2.0, None, 4.0])
    assert (mean, n) == (pytest.approx(7 / 3), 3)
    assert spread == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2
                                              + (4 - 7 / 3) ** 2) / 2))
    assert mean_spread([5.0]) == (5.0, None, 1)
    assert mean_spread([None]) == (None, None, 0)


def _runs(method_ppl, method_curve, base_ppl=(5.0, 5.2), other_ppl=(6.0, 6.1)):
    base = LossCurve([10.0, 20.0], [1.8, 1.6])
    other = LossCurve([5.0, 8.0], [1.9, 1.7])
    return {"m": [(p, method_curve) for p in method_ppl],
            "b": [(p, base) for p in base_ppl], "o": [(p, other) for p in other_ppl]}


def test_headline_check_by_hand():
    # the method: ppl 4.5 / 4.7; reaches b's final loss 1.6 at 12 s (of b's 20 s): 0.6x
    fast = LossCurve([8.0, 16.0], [1.7, 1.5])
    v = headline("iid", "m", ["b", "o"], _runs((4.5, 4.7), fast), 0.8)
    assert v is not None
    assert (v.best_ppl_baseline, v.best_ppl, v.method_ppl) == ("b", 5.1, pytest.approx(4.6))
    assert v.lowest_ppl and v.margin_beats_spread  # 0.5 > max(0.141, 0.141)
    assert (v.best_loss_baseline, v.target_loss) == ("b", 1.6)
    assert v.method_time == pytest.approx(12.0) and v.baseline_time == 20.0
    assert v.time_ratio == pytest.approx(0.6) and v.fast_enough
    assert "0.60x" in v.line(0.8) and "met" in v.line(0.8)

    # lower perplexity by less than the seeds' spread, and too slow
    slow = LossCurve([10.0, 40.0], [1.7, 1.55])
    v = headline("iid", "m", ["b", "o"], _runs((4.9, 5.2), slow), 0.8)
    assert v.lowest_ppl and not v.margin_beats_spread  # 0.05 < 0.212
    assert v.time_ratio == pytest.approx((10 + 30 * 0.1 / 0.15) / 20) and not v.fast_enough

    # never reaching the target, and a higher perplexity: both said
    never = LossCurve([10.0, 20.0], [1.9, 1.7])
    v = headline("dirichlet", "m", ["b", "o"], _runs((5.5, 5.6), never), 0.8)
    assert not v.lowest_ppl and v.time_ratio is None and not v.fast_enough
    assert "NOT lower" in v.line(0.8) and "never" in v.line(0.8)

    assert headline("iid", "m", ["b"], {"m": [], "b": [(5.0, fast)]}, 0.8) is None
