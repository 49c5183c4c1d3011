"""utils/stats.py: the paired t interval equals scipy's own paired test, and says when it holds 0."""
import numpy as np
import pytest
from scipy import stats

from utils.stats import paired_difference


def test_interval_equals_scipys_paired_t_test():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        a, b = rng.normal(0.5, 0.1, n), rng.normal(0.48, 0.1, n)
        got = paired_difference(a - b)
        ref = stats.ttest_rel(a, b).confidence_interval(0.95)
        assert got.mean == pytest.approx(float(np.mean(a - b)), abs=1e-12)
        assert (got.low, got.high) == (pytest.approx(ref.low, abs=1e-12), pytest.approx(ref.high, abs=1e-12))


def test_what_the_interval_says():
    assert paired_difference([0.010, 0.012, 0.011]).detected
    unclear = paired_difference([0.02, -0.01, 0.005])
    assert not unclear.detected and "no detectable effect at this precision" in unclear.describe()
    assert paired_difference([0.01]).low is None and "no interval" in paired_difference([0.01]).describe()
    assert "+1.10 points, 95 % CI [+" in paired_difference([0.010, 0.012, 0.011]).describe()
    with pytest.raises(ValueError):
        paired_difference([])


def test_seeds_that_would_exclude_zero_at_the_same_mean_and_spread():
    margins = [0.0441, 0.0256, 0.0191]  # one draw of the scribble demo, whose interval holds 0
    got = paired_difference(margins)
    assert not got.detected
    mean, sd = float(np.mean(margins)), float(np.std(margins, ddof=1))

    def excludes_zero(n):  # the t interval of n seeds with this mean and sample deviation
        return stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n) < abs(mean)

    assert not excludes_zero(3) and excludes_zero(4)
    assert got.seeds_to_detect() == 4
    assert "about 4 seeds would exclude 0 if the mean and spread held" in got.describe()


def test_no_seed_count_where_it_means_nothing():
    assert paired_difference([0.010, 0.012, 0.011]).seeds_to_detect() is None  # already detected
    assert paired_difference([0.01, -0.01]).seeds_to_detect() is None          # mean exactly 0
    assert paired_difference([0.01]).seeds_to_detect() is None                 # no spread known
    far = paired_difference([0.02, -0.019, 0.001])                             # mean far inside the spread
    assert far.seeds_to_detect(max_seeds=20) is None and "seeds would exclude" not in far.describe()
