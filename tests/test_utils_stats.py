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
