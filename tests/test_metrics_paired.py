"""``bc.metrics.paired_difference``: the mean of paired per-item differences with a per-item and
a block (clustered) standard error, against hand computations and the textbook formulas."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from bayes_colora.metrics import paired_difference


def test_paired_difference_equals_the_hand_computation():
    # d = 1, 3, 2, 6: mean 3, deviations -2, 0, -1, 3 (sum of squares 14, sd^2 = 14 / 3)
    out = paired_difference([1.0, 3.0, 2.0, 6.0], block=2)
    assert out["mean"] == pytest.approx(3.0, rel=1e-15)
    assert out["se_frame"] == pytest.approx(math.sqrt(14 / 3 / 4), rel=1e-14)
    # blocks (1, 3) and (2, 6): means 2 and 4, sd sqrt(2), SE sqrt(2) / sqrt(2) = 1
    assert out["se_block"] == pytest.approx(1.0, rel=1e-14)
    assert out["frames"] == 4
    # fewer than two blocks' worth of frames: no block SE
    assert paired_difference([1.0, 3.0, 2.0, 6.0], block=3)["se_block"] is None
    # weights 1, 3 on d = 1, 3: mean 10 / 4 = 2.5, residuals w (d - mean) = -1.5, +1.5,
    # SE^2 = 2 / 1 * (1.5^2 + 1.5^2) / 4^2 = 9 / 16
    out = paired_difference([1.0, 3.0], weight=[1, 3])
    assert out["mean"] == pytest.approx(2.5, rel=1e-15)
    assert out["se_frame"] == pytest.approx(0.75, rel=1e-14)
    # a missing frame has no weight: the same as leaving it out
    assert paired_difference([1.0, None, 3.0], weight=[1, 5, 3])["mean"] == pytest.approx(2.5)
    assert paired_difference([1.0], block=1)["se_frame"] is None
    assert paired_difference([1.0, 3.0, 2.0, 6.0])["se_block"] is None  # no block given


def test_block_se_over_twenty_frame_blocks_is_the_sd_of_block_means():
    g = torch.Generator().manual_seed(3)
    d = (torch.randn(60, generator=g, dtype=torch.float64) + 0.1 * torch.arange(60)).tolist()
    out = paired_difference(d, block=20)
    means = [statistics.fmean(d[i:i + 20]) for i in (0, 20, 40)]
    assert out["mean"] == pytest.approx(statistics.fmean(d), rel=1e-13)
    assert out["se_frame"] == pytest.approx(statistics.stdev(d) / math.sqrt(60), rel=1e-12)
    assert out["se_block"] == pytest.approx(statistics.stdev(means) / math.sqrt(3), rel=1e-12)
    # the drift makes neighbouring frames alike: the block SE is the larger
    assert out["se_block"] > out["se_frame"]
    assert paired_difference(d[:39], block=20)["se_block"] is None
    assert paired_difference(d[:40], block=20)["se_block"] is not None
