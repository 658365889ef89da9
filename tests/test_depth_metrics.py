"""bc.depth metrics against analytic values (sparsification itself: tests/test_metrics.py)."""
import math

import pytest
import torch

import bayes_colora as bc
from bayes_colora.depth import depth_metrics, depth_nll, evaluate_depth


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
