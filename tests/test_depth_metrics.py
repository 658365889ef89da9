"""bc.depth metrics against analytic values and hand-computed sparsification curves."""
import math

import pytest
import torch

import bayes_colora as bc
from bayes_colora.depth import (DEFAULT_FRACTIONS, aurg, ause, depth_metrics, depth_nll,
                                evaluate_depth, sparsification_curve)

QUARTERS = (0.0, 0.25, 0.5, 0.75)


def depths(seed: int = 0, shape=(2, 1, 4, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 9.5 * torch.rand(*shape, generator=g, dtype=torch.float64)


def one_image(values) -> torch.Tensor:
    """A (1, 1, 1, N) map holding ``values``."""
    return torch.tensor(values, dtype=torch.float64).reshape(1, 1, 1, -1)


# --------------------------------------------------------------------------- Eigen metrics

def test_uniform_ten_percent_overestimate_has_analytic_metrics():
    gt = depths()
    m = depth_metrics(1.1 * gt, gt)
    assert m["abs_rel"] == pytest.approx(0.1, rel=1e-12)
    assert m["rmse_log"] == pytest.approx(math.log(1.1), rel=1e-12)
    assert m["log10"] == pytest.approx(math.log10(1.1), rel=1e-12)
    assert m["delta1"] == m["delta2"] == m["delta3"] == 1.0           # 1.1 < 1.25
    # (0.1 d*)^2 / d* = 0.01 d*, and rmse = 0.1 sqrt(mean d*^2), each per image, then averaged
    per_image = gt.flatten(1)
    assert m["sq_rel"] == pytest.approx(0.01 * per_image.mean(1).mean().item(), rel=1e-12)
    assert m["rmse"] == pytest.approx(0.1 * per_image.pow(2).mean(1).sqrt().mean().item(), rel=1e-12)


def test_delta_thresholds_count_ratios_in_either_direction():
    gt = one_image([1.0, 1.0, 1.0, 1.0, 2.0])
    pred = one_image([1.2, 1 / 1.5, 1.7, 2.5, 2.0])   # ratios 1.2, 1.5, 1.7, 2.5, 1
    m = depth_metrics(pred, gt)
    # 1.25^2 = 1.5625, 1.25^3 = 1.953
    assert (m["delta1"], m["delta2"], m["delta3"]) == pytest.approx((0.4, 0.6, 0.8))


def test_metrics_are_per_image_means_averaged_over_images():
    gt = torch.ones(2, 1, 1, 4, dtype=torch.float64)
    pred = gt.clone()
    pred[0, 0, 0, 0] = 3.0                                  # image 0: one pixel off by 2
    mask = torch.tensor([[True, False, False, False], [True] * 4]).reshape(2, 1, 1, 4)
    m = depth_metrics(pred, gt, mask)
    # image 0 keeps only the bad pixel: abs_rel 2, rmse 2; image 1 is perfect
    assert m["abs_rel"] == pytest.approx(1.0) and m["rmse"] == pytest.approx(1.0)
    assert m["delta1"] == pytest.approx(0.5)


def test_invalid_and_masked_pixels_are_ignored():
    gt = depths()
    pred = 1.1 * gt
    holes_gt, holes_pred = gt.clone(), pred.clone()
    holes_gt[0, 0, 0, :3] = torch.tensor([0.0, math.nan, 5e-4])   # missing, NaN, below min_depth
    holes_pred[0, 0, 0, :3] = torch.tensor([math.nan, -7.0, 1e9])
    holes_gt[1, 0, 2, 2] = 50.0                                     # beyond max_depth
    holes_pred[1, 0, 3, 4] = math.inf                               # masked out
    mask = torch.ones_like(gt, dtype=torch.bool)
    mask[1, 0, 3, 4] = False
    m = depth_metrics(holes_pred, holes_gt, mask, max_depth=20.0)
    assert m["abs_rel"] == pytest.approx(0.1, rel=1e-12)
    assert m["delta1"] == 1.0
    keep = torch.ones_like(gt, dtype=torch.bool)
    keep[0, 0, 0, :3] = keep[1, 0, 2, 2] = keep[1, 0, 3, 4] = False
    want = [0.1 * gt[b][keep[b]].pow(2).mean().sqrt().item() for b in range(2)]
    assert m["rmse"] == pytest.approx(sum(want) / 2, rel=1e-12)


def test_predictions_are_clamped_to_the_depth_caps():
    gt = one_image([1.0, 4.0])
    m = depth_metrics(one_image([-3.0, 100.0]), gt, min_depth=0.5, max_depth=5.0)  # -> 0.5, 5
    assert m["abs_rel"] == pytest.approx((0.5 + 0.25) / 2)


def test_depth_nll_is_the_pooled_gaussian_nll_of_valid_pixels():
    gt = depths()
    gt[0, 0, 0, 0] = 0.0
    mean = gt + 0.2
    var = torch.full_like(gt, 0.04)                          # every valid pixel one sd away
    want = 0.5 * (1 + math.log(0.04) + math.log(2 * math.pi))
    assert depth_nll(mean, var, gt) == pytest.approx(want, rel=1e-12)


ONES, ZEROS = torch.ones(1, 2, 2), torch.zeros(1, 2, 2)


@pytest.mark.parametrize("call, error, match", [
    (lambda: depth_metrics(ONES, torch.ones(1, 2, 3)), ValueError, r"\(1, 2, 2\).*\(1, 2, 3\)"),
    (lambda: depth_metrics(torch.ones(4, 4), torch.ones(4, 4)), ValueError, "leading image axis"),
    (lambda: depth_metrics(ONES, ZEROS), ValueError, "no valid pixel"),
    (lambda: depth_metrics(ONES, ONES, ONES), TypeError, "boolean"),
    (lambda: depth_metrics(ONES, ONES, torch.ones(1, 4, dtype=torch.bool)), ValueError, "mask shape"),
    (lambda: depth_metrics(ONES, ONES, min_depth=0.0), ValueError, "positive"),
    (lambda: depth_metrics(ONES, ONES, max_depth=1e-4), ValueError, "max_depth"),
    (lambda: depth_metrics(torch.full((1, 2, 2), math.nan), ONES), ValueError, "pred has 4 non-finite"),
])
def test_bad_metric_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------- sparsification

def test_reversed_ranking_curves_and_areas_by_hand():
    error = one_image([1.0, 2.0, 3.0, 4.0])
    reversed_u = one_image([4.0, 3.0, 2.0, 1.0])             # most confident where the error is largest
    # removing 0, 1, 2, 3 of 4 pixels: model keeps the largest errors, oracle the smallest
    model = sparsification_curve(error, reversed_u, fractions=QUARTERS)
    oracle = sparsification_curve(error, error, fractions=QUARTERS)
    torch.testing.assert_close(model, torch.tensor([[2.5, 3.0, 3.5, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(oracle, torch.tensor([[2.5, 2.0, 1.5, 1.0]], dtype=torch.float64))
    # trapezoids over [0, 1] closed by (1, 0): model 0.25 (2.75 + 3.25 + 3.75 + 2) = 2.9375,
    # oracle 0.25 (2.25 + 1.75 + 1.25 + 0.5) = 1.4375, random 0.25 (3 * 2.5 + 1.25) = 2.1875
    assert ause(error, reversed_u, fractions=QUARTERS) == pytest.approx(1.5)
    assert aurg(error, reversed_u, fractions=QUARTERS) == pytest.approx(2.1875 - 2.9375)
    assert aurg(error, error, fractions=QUARTERS) == pytest.approx(2.1875 - 1.4375)


def test_rms_reduction_by_hand():
    error = one_image([1.0, 2.0, 3.0, 4.0])
    model = sparsification_curve(error, one_image([4.0, 3.0, 2.0, 1.0]), fractions=QUARTERS, reduce="rms")
    want = torch.tensor([[math.sqrt(30 / 4), math.sqrt(29 / 3), math.sqrt(25 / 2), 4.0]], dtype=torch.float64)
    torch.testing.assert_close(model, want)


def test_fractional_removal_and_ties_in_expectation():
    error = one_image([1.0, 2.0, 3.0, 4.0])
    # 0.1 * 4 = 0.4 pixel of the error-4 pixel removed: (10 - 0.4 * 4) / 3.6
    curve = sparsification_curve(error, error, fractions=(0.0, 0.1))
    assert curve[0, 1].item() == pytest.approx(8.4 / 3.6)
    # pixels 1 and 2 tie for most uncertain: removing one leaves mean(2,3,4) = 3 or mean(1,3,4) = 8/3
    tied = sparsification_curve(error, one_image([1.0, 1.0, 0.0, 0.0]), fractions=QUARTERS)
    assert tied[0, 1].item() == pytest.approx((3 + 8 / 3) / 2)
    assert tied[0, 2].item() == pytest.approx(3.5)             # the whole tie group is gone


def test_perfect_ranking_has_zero_ause_and_positive_aurg():
    g = torch.Generator().manual_seed(3)
    error = torch.rand(3, 1, 10, 10, generator=g, dtype=torch.float64)
    for reduce in ("mean", "rms"):
        assert ause(error, error, reduce=reduce) == pytest.approx(0.0, abs=1e-15)
        # any increasing function of the error ranks the same way
        assert ause(error, 2 * error ** 2 + 1, reduce=reduce) == pytest.approx(0.0, abs=1e-15)
        assert aurg(error, error, reduce=reduce) > 0.1


def test_constant_uncertainty_is_the_random_curve():
    error = depths(seed=4)
    flat = torch.ones_like(error)
    curve = sparsification_curve(error, flat)
    torch.testing.assert_close(curve, error.flatten(1).mean(1, keepdim=True).expand_as(curve))
    # exactly 0 in exact arithmetic; float64 rounding of the group means leaves ~1e-16
    assert aurg(error, flat) == pytest.approx(0.0, abs=1e-12)
    assert aurg(error, flat, reduce="rms") == pytest.approx(0.0, abs=1e-12)


def test_uninformative_uncertainty_has_aurg_within_random_permutation_noise():
    # For an uncertainty independent of the error the removal order is a uniform random permutation,
    # so the curve at f (k = f N removed, m = N - k left) is the mean of m errors drawn without
    # replacement: mean = the full mean, sd = s sqrt((N - m) / (m (N - 1))) with s^2 the
    # population variance. AURG = sum_j w_j (full - curve_j) (trapezoid weights w_j; the closing
    # points cancel), so sd(AURG) <= sum_j w_j sd_j per image (Minkowski), / sqrt(B) over B images.
    b, n = 8, 1000
    g = torch.Generator().manual_seed(5)
    error = torch.rand(b, 1, 1, n, generator=g, dtype=torch.float64) ** 3
    noise = torch.rand(b, 1, 1, n, generator=g, dtype=torch.float64)
    f = torch.tensor(DEFAULT_FRACTIONS, dtype=torch.float64)
    x = torch.cat([f, torch.ones(1, dtype=torch.float64)])
    w = torch.zeros_like(x)
    w[:-1] += x.diff() / 2
    w[1:] += x.diff() / 2
    m = n - f * n
    sd_bounds = [(w[:-1] * e.std(unbiased=False) * ((n - m) / (m * (n - 1))).sqrt()).sum().item()
                 for e in error.flatten(1)]
    bound = sum(sd_bounds) / b / math.sqrt(b)
    value = aurg(error, noise)
    assert abs(value) < 4 * bound, (value, bound)
    assert aurg(error, error) > 20 * bound                     # the bound has power


def test_mask_drops_pixels_from_sparsification():
    error = one_image([1.0, 2.0, 3.0, 4.0, 100.0])
    u = one_image([4.0, 3.0, 2.0, 1.0, math.nan])
    mask = one_image([1, 1, 1, 1, 0]).bool()
    assert ause(error, u, mask, fractions=QUARTERS) == pytest.approx(1.5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(fractions=(0.1, 0.5)), ValueError, "from 0"),
    (dict(fractions=(0.0, 0.5, 0.5)), ValueError, "increase strictly"),
    (dict(fractions=(0.0, 1.0)), ValueError, "below 1"),
    (dict(reduce="median"), ValueError, "reduce must be"),
])
def test_bad_sparsification_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        ause(one_image([1.0, 2.0]), one_image([1.0, 2.0]), **kwargs)


def test_bad_sparsification_inputs_raise():
    with pytest.raises(ValueError, match="non-negative"):
        ause(one_image([-1.0, 2.0]), one_image([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"error shape \(1, 1, 1, 2\) does not match uncertainty"):
        ause(one_image([1.0, 2.0]), one_image([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="error has 1 non-finite"):
        ause(one_image([math.nan, 2.0]), one_image([1.0, 2.0]))
    with pytest.raises(ValueError, match="uncertainty has 1 non-finite"):
        ause(one_image([1.0, 2.0]), one_image([math.inf, 2.0]))


# --------------------------------------------------------------------------- evaluate_depth

def test_evaluate_depth_combines_the_metrics_with_known_values():
    gt = depths(seed=6)
    g = torch.Generator().manual_seed(7)
    offset = 0.02 * gt * torch.randn(gt.shape, generator=g, dtype=torch.float64)
    gt[1, 0, 0, 0] = 0.0                                      # a hole
    pred = bc.Predictive(mean=gt + offset, aleatoric=offset ** 2, epistemic=torch.zeros_like(gt),
                         total=offset ** 2)                     # std = |error|: a perfect ranking
    out = evaluate_depth(pred, gt)
    valid = gt > 0
    assert out["rmse"] == pytest.approx(depth_metrics(pred.mean, gt)["rmse"])
    # every valid pixel is one sd off: nll = mean 0.5 (1 + log v + log 2 pi); |z| = 1 lies inside the
    # central interval at level p iff p >= 0.6827, so levels 0.70..0.95 cover 1, 0.05..0.65 cover 0
    want_nll = (0.5 * (1 + offset[valid].pow(2).log() + math.log(2 * math.pi))).mean().item()
    assert out["nll"] == pytest.approx(want_nll, rel=1e-12)
    assert out["coverage_90"] == 1.0
    assert out["calibration_error"] == pytest.approx((0.05 * 91 + 1.05) / 19)
    assert out["ause_rmse"] == pytest.approx(0.0, abs=1e-12)
    assert out["aurg_rmse"] > 0 and out["aurg_abs_rel"] > 0
    assert set(out) == {"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3",
                        "nll", "calibration_error", "coverage_90",
                        "ause_abs_rel", "aurg_abs_rel", "ause_rmse", "aurg_rmse"}


def test_calibrated_log_normal_depth_predictive_covers_ninety_percent():
    # truth drawn from the predictive: y = exp(mu + s eps), s per pixel in [0.03, 0.2] (log space)
    g = torch.Generator().manual_seed(8)
    shape = (4, 1, 20, 50)                                   # N = 4000 pixels
    mu = torch.log(depths(seed=9, shape=shape))
    s = 0.03 + 0.17 * torch.rand(shape, generator=g, dtype=torch.float64)
    gt = (mu + s * torch.randn(shape, generator=g, dtype=torch.float64)).exp()
    lik = bc.depth.DepthLikelihood(space="log", heteroscedastic=True)
    pred = bc.Predictive(**lik.moments(torch.cat([mu, 2 * s.log()], 1)[None]))
    out = evaluate_depth(pred, gt)
    # pixel i lies in the Gaussian interval m +- z sd (z = 1.645) of its log-normal with exact
    # probability p_i = Phi(log(m + z sd) / s - mu / s) - Phi(...m - z sd...) (0.9002 at s = 0.03,
    # 0.9101 at s = 0.2: the skew); the coverage is a mean of Bernoulli(p_i), sd sqrt(sum p(1-p)) / N
    z = torch.special.ndtri(torch.tensor(0.95, dtype=torch.float64))
    m, sd = pred.mean, pred.std
    p = torch.special.ndtr(((m + z * sd).log() - mu) / s) - torch.special.ndtr(((m - z * sd).log() - mu) / s)
    assert abs(out["coverage_90"] - p.mean().item()) < 4 * (p * (1 - p)).sum().sqrt().item() / p.numel()
    assert 0.9002 < p.mean().item() < 0.9101                 # 0.9 up to the skew
    # the std grows with s and so with the error: better than random, short of the oracle
    assert out["aurg_abs_rel"] > 0 and out["ause_abs_rel"] > 0
    assert out["aurg_rmse"] > 0 and out["ause_rmse"] > 0
