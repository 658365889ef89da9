"""bc.metrics against analytic values, reference implementations and binomial error bounds."""
import math

import pytest
import torch
import torch.nn.functional as F

import bayes_colora as bc
from bayes_colora import metrics as M

LEVELS = torch.tensor(M.DEFAULT_LEVELS, dtype=torch.float64)


def normal_grid(n: int) -> torch.Tensor:
    """Midpoint quantiles Phi^{-1}((i - 1/2) / n) of N(0, 1): any central interval of
    probability q holds n q +- 1 of them, so coverages are exact to 1/n."""
    return torch.special.ndtri((torch.arange(1, n + 1, dtype=torch.float64) - 0.5) / n)


def central_z(p: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtri((1 + p) / 2)


def calibrated_probs(shape: tuple[int, ...], n_classes: int, seed: int):
    """Dirichlet(1) probabilities (normalised exponentials; classes on axis 1) and labels drawn
    from them: top-label calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    e = -torch.rand(math.prod(shape), n_classes, generator=g, dtype=torch.float64).log()
    flat = e / e.sum(1, keepdim=True)
    y = torch.multinomial(flat, 1, generator=g).squeeze(1)
    return flat.reshape(*shape, n_classes).movedim(-1, 1), y.reshape(shape)


# --------------------------------------------------------------------------- classification

def test_ece_of_calibrated_predictor_is_within_binomial_noise():
    probs, y = calibrated_probs((50, 20, 20), n_classes=4, seed=1)  # (B, C, H, W): 20000 predictions
    n_bins = 15
    conf = probs.max(1).values.reshape(-1)
    correct = (probs.argmax(1) == y).reshape(-1).double()
    # bin b's accuracy - confidence is a mean of n_b independent centred Bernoulli(c_i) errors, of
    # sd s_b = sqrt(sum_{i in b} c_i (1 - c_i)) / n_b, so E[ECE] <= sum_b (n_b / N) s_b =: s (and
    # ~ sqrt(2/pi) s). The ECE's own spread is far below s, so 3 s is a safe, sharp bound.
    idx = (conf * n_bins).long().clamp_max(n_bins - 1)
    var_sum = torch.zeros(n_bins, dtype=torch.float64).index_add(0, idx, conf * (1 - conf))
    s = (var_sum.sqrt() / conf.numel()).sum().item()
    value = M.ece(probs, y, n_bins)
    assert value < 3 * s, (value, s)
    # the bound has power: a sharpened (overconfident) version of the same predictor exceeds it
    sharp = (4 * probs.log()).softmax(1)
    assert M.ece(sharp, y, n_bins) > 3 * s
    assert correct.mean().item() == pytest.approx(M.accuracy(probs, y))


@pytest.mark.parametrize("probs_row, frac_correct, gap", [
    ([0.1, 0.9], 0.6, 0.3),              # binary, overconfident
    ([0.7, 0.2, 0.1], 0.5, 0.2),         # three classes, overconfident
    ([0.45, 0.55], 0.75, 0.2),           # binary, underconfident
])
def test_ece_of_constant_predictor_is_the_confidence_accuracy_gap(probs_row, frac_correct, gap):
    n = 200
    top = max(range(len(probs_row)), key=probs_row.__getitem__)
    other = (top + 1) % len(probs_row)
    n_right = round(frac_correct * n)
    y = torch.tensor([top] * n_right + [other] * (n - n_right))
    probs = torch.tensor(probs_row).expand(n, -1)
    assert M.ece(probs, y) == pytest.approx(gap, abs=1e-6)
    assert M.accuracy(probs, y) == pytest.approx(frac_correct)
    bins = M.reliability_bins(probs, y)
    assert int(bins.counts.sum()) == n and int((bins.counts > 0).sum()) == 1


def test_reliability_bins_by_hand():
    # n_bins = 4: bins (0, .25], (.25, .5], (.5, .75], (.75, 1]
    probs = torch.tensor([[0.6, 0.4, 0], [0.35, 0.65, 0], [0.1, 0.9, 0], [0.5, 0.3, 0.2],
                          [0, 1, 0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 0, 0])
    bins = M.reliability_bins(probs, y, n_bins=4)
    assert torch.equal(bins.edges, torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    assert bins.counts.tolist() == [0, 1, 2, 2]  # 0.5 sits in (.25, .5]; 1.0 in the last bin
    assert bins.confidence[1:].tolist() == pytest.approx([0.5, 0.625, 0.95])
    assert bins.accuracy[1:].tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert bins.confidence[0].isnan() and bins.accuracy[0].isnan()
    # ECE = (1 |1 - .5| + 2 |.5 - .625| + 2 |.5 - .95|) / 5
    assert M.ece(probs, y, n_bins=4) == pytest.approx((0.5 + 0.25 + 0.9) / 5)


def test_categorical_nll_matches_cross_entropy_and_hand_value():
    probs = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    assert M.categorical_nll(probs, torch.tensor([0, 1])) == pytest.approx(
        -(math.log(0.5) + math.log(0.8)) / 2)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (3, 4, 2), generator=g)
    assert M.categorical_nll(logits.softmax(1), y) == pytest.approx(
        F.cross_entropy(logits, y).item(), rel=1e-10)
    # a zero probability on the true class costs -log 1e-12 instead of inf
    assert M.categorical_nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(
        -math.log(1e-12))


def test_accuracy_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    assert M.accuracy(probs, torch.tensor([0, 1, 1, 0])) == 0.5


# --------------------------------------------------------------------------- regression

def test_rmse_mae_by_hand():
    mean, y = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([3.0, 4.0, 1.0])
    assert M.rmse(mean, y) == pytest.approx(math.sqrt(25 / 3))
    assert M.mae(mean, y) == pytest.approx(7 / 3)


def test_gaussian_nll_analytic_and_reference():
    assert M.gaussian_nll(torch.tensor([1.0]), torch.tensor([4.0]), torch.tensor([3.0])) == \
        pytest.approx(0.5 * (1 + math.log(4) + math.log(2 * math.pi)))
    g = torch.Generator().manual_seed(0)
    mean, y = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    var = torch.rand(6, 7, generator=g) + 0.1
    ref = -torch.distributions.Normal(mean.double(), var.double().sqrt()).log_prob(y.double()).mean()
    assert M.gaussian_nll(mean, var, y) == pytest.approx(ref.item(), rel=1e-10)
    # a scalar variance broadcasts: sigma = 0.5 everywhere
    ref = -torch.distributions.Normal(mean.double(), 0.5).log_prob(y.double()).mean()
    assert M.gaussian_nll(mean, 0.25, y) == pytest.approx(ref.item(), rel=1e-10)


def sampled_predictive(n: int = 20000, seed: int = 0):
    """mean, var per element and y drawn from N(mean, var) itself."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, generator=g, dtype=torch.float64)
    var = 0.5 + 1.5 * torch.rand(n, generator=g, dtype=torch.float64)
    y = mean + var.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    return mean, var, y


def test_coverage_of_samples_from_the_predictive_is_the_level():
    mean, var, y = sampled_predictive()
    n = y.numel()
    observed = M.regression_calibration(mean, var, y)
    assert observed.shape == LEVELS.shape
    # each coverage is a Binomial(n, p) / n proportion: 4 standard errors
    tol = 4 * (LEVELS * (1 - LEVELS) / n).sqrt()
    assert ((observed - LEVELS).abs() <= tol).all(), (observed - LEVELS) / tol
    assert M.interval_coverage(mean, var, y, level=0.9) == pytest.approx(observed[-2].item())


def test_variance_scaled_by_four_over_covers_by_the_analytic_amount():
    # intervals of sigma = 2 sqrt(var) on data of sigma = sqrt(var): P(|Z| <= 2 z_p) = 2 Phi(2 z_p) - 1
    mean, var, y = sampled_predictive(seed=1)
    n = y.numel()
    expected = 2 * torch.special.ndtr(2 * central_z(LEVELS)) - 1
    observed = M.regression_calibration(mean, 4 * var, y)
    tol = 4 * (expected * (1 - expected) / n).sqrt()
    assert ((observed - expected).abs() <= tol).all()
    assert (observed > LEVELS).all()


def test_quantile_grid_gives_exact_coverage_and_calibration_error():
    n = 4001
    y = normal_grid(n)
    zeros = torch.zeros(n, dtype=torch.float64)
    eps = 1 / n + 1e-12
    assert (M.regression_calibration(zeros, 1.0, y) - LEVELS).abs().max() <= eps
    assert M.quantile_calibration_error(zeros, 1.0, y) <= eps
    assert M.interval_coverage(zeros, 1.0, y, level=0.9) == pytest.approx(0.9, abs=eps)
    # variance x4: QCE = mean_l |2 Phi(2 z_l) - 1 - p_l| (about 0.216)
    analytic = ((2 * torch.special.ndtr(2 * central_z(LEVELS)) - 1) - LEVELS).abs().mean().item()
    assert M.quantile_calibration_error(zeros, 4.0, y) == pytest.approx(analytic, abs=eps)
    # a variance / 4 under-covers: 2 Phi(z_p / 2) - 1 < p
    narrow = 2 * torch.special.ndtr(central_z(LEVELS) / 2) - 1
    assert (M.regression_calibration(zeros, 0.25, y) - narrow).abs().max() <= eps
    # custom levels
    assert M.regression_calibration(zeros, 1.0, y, levels=(0.5,)).item() == pytest.approx(0.5, abs=eps)


@pytest.mark.parametrize("fn", [
    lambda mean, var, y, mask: M.rmse(mean, y, mask=mask),
    lambda mean, var, y, mask: M.mae(mean, y, mask=mask),
    lambda mean, var, y, mask: M.gaussian_nll(mean, var, y, mask=mask),
    lambda mean, var, y, mask: M.quantile_calibration_error(mean, var, y, mask=mask),
    lambda mean, var, y, mask: M.interval_coverage(mean, var, y, mask=mask),
], ids=["rmse", "mae", "gaussian_nll", "quantile_calibration_error", "interval_coverage"])
def test_mask_selects_valid_elements_and_ignores_nan_outside(fn):
    g = torch.Generator().manual_seed(0)
    mean, y = torch.randn(4, 5, 6, generator=g), torch.randn(4, 5, 6, generator=g)
    var = torch.rand(4, 5, 6, generator=g) + 0.2
    mask = torch.rand(4, 5, 6, generator=g) > 0.3
    expected = fn(mean[mask], var[mask], y[mask], None)
    y_bad, mean_bad, var_bad = y.clone(), mean.clone(), var.clone()
    y_bad[~mask], mean_bad[~mask], var_bad[~mask] = float("nan"), float("inf"), -1.0
    assert fn(mean_bad, var_bad, y_bad, mask) == pytest.approx(expected, rel=1e-12)
    assert fn(mean, var, y, mask) != pytest.approx(fn(mean, var, y, None), rel=1e-6)


def test_regression_calibration_mask_matches_subset():
    mean, var, y = sampled_predictive(n=1000)
    mask = torch.arange(1000) % 3 > 0
    assert torch.equal(M.regression_calibration(mean, var, y, mask=mask),
                       M.regression_calibration(mean[mask], var[mask], y[mask]))


# --------------------------------------------------------------------------- summarize

def test_summarize_regression_known_answers():
    n = 2001
    y = normal_grid(n).float()
    ones = torch.ones(n)
    pred = bc.Predictive(mean=torch.zeros(n), aleatoric=0.75 * ones, epistemic=0.25 * ones, total=ones)
    out = M.summarize(pred, y, "regression")
    assert set(out) == {"rmse", "mae", "nll", "calibration_error", "coverage_90"}
    second_moment = y.double().pow(2).mean().item()
    assert out["rmse"] == pytest.approx(math.sqrt(second_moment))
    assert out["nll"] == pytest.approx(0.5 * (second_moment + math.log(2 * math.pi)))
    assert out["calibration_error"] <= 1 / n + 1e-6
    assert out["coverage_90"] == pytest.approx(0.9, abs=1 / n + 1e-6)
    # mask passes through; a Gaussian likelihood names the task
    mask = y > 0
    masked = M.summarize(pred, y, bc.Gaussian(sigma=1.0), mask=mask)
    assert masked["mae"] == pytest.approx(y[mask].double().mean().item())


def test_summarize_classification_known_answers():
    n = 100
    logits = torch.tensor([0.1, 0.9]).log().expand(n, -1)
    moments = bc.Categorical().moments(logits[None])  # one posterior sample: probs (0.1, 0.9)
    pred = bc.Predictive(**moments)
    y = torch.tensor([1] * 60 + [0] * 40)
    out = M.summarize(pred, y, bc.Categorical())
    assert out == pytest.approx({"accuracy": 0.6, "ece": 0.3,
                                 "nll": -(0.6 * math.log(0.9) + 0.4 * math.log(0.1))}, abs=1e-6)
    assert M.summarize(pred, y, "classification") == out


# --------------------------------------------------------------------------- errors

def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"mean shape \(3,\).*target shape \(4,\)"):
        M.rmse(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"var shape \(2,\).*target shape \(4,\)"):
        M.gaussian_nll(torch.zeros(4), torch.ones(2), torch.zeros(4))
    with pytest.raises(ValueError, match=r"target shape \(4,\).*probs shape \(5, 3\)"):
        M.ece(torch.full((5, 3), 1 / 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask shape \(3,\).*target shape \(4,\)"):
        M.mae(torch.zeros(4), torch.zeros(4), mask=torch.ones(3, dtype=torch.bool))


def test_non_finite_input_is_refused():
    y = torch.tensor([0.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match=r"y has 1 non-finite.*mask="):
        M.rmse(torch.zeros(3), y)
    with pytest.raises(ValueError, match=r"var has 1 non-finite"):
        M.interval_coverage(torch.zeros(3), torch.tensor([1.0, float("inf"), 1.0]), torch.zeros(3))
    with pytest.raises(ValueError, match=r"mean has 1 non-finite.*at valid elements"):
        M.gaussian_nll(torch.tensor([0.0, float("inf")]), 1.0, torch.zeros(2),
                       mask=torch.tensor([True, True]))
    with pytest.raises(ValueError, match=r"probs has 1 non-finite"):
        M.accuracy(torch.tensor([[0.5, float("nan")]]), torch.tensor([0]))


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="var must be positive"):
        M.gaussian_nll(torch.zeros(2), torch.tensor([1.0, -0.5]), torch.zeros(2))
    with pytest.raises(TypeError, match="mask must be a boolean"):
        M.rmse(torch.zeros(2), torch.zeros(2), mask=torch.ones(2))
    with pytest.raises(ValueError, match="mask is all False"):
        M.rmse(torch.zeros(2), torch.zeros(2), mask=torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"levels must be probabilities strictly inside \(0, 1\)"):
        M.regression_calibration(torch.zeros(2), 1.0, torch.zeros(2), levels=(0.5, 1.0))
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        M.ece(torch.full((2, 2), 0.5), torch.zeros(2, dtype=torch.long), n_bins=0)
    with pytest.raises(ValueError, match="summing to 1.*softmax"):
        M.categorical_nll(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))
    with pytest.raises(TypeError, match="integer class indices"):
        M.accuracy(torch.full((2, 2), 0.5), torch.zeros(2))
    with pytest.raises(ValueError, match=r"class index out of range \[0, 2\)"):
        M.accuracy(torch.full((2, 2), 0.5), torch.tensor([0, 2]))


def test_summarize_errors():
    pred = bc.Predictive(mean=torch.zeros(3), aleatoric=torch.ones(3), epistemic=torch.zeros(3),
                         total=torch.ones(3))
    with pytest.raises(ValueError, match="likelihood_task must be 'regression' or 'classification'"):
        M.summarize(pred, torch.zeros(3), "segmentation")
    with pytest.raises(ValueError, match="no class probabilities"):
        M.summarize(pred, torch.zeros(3, dtype=torch.long), "classification")


# --------------------------------------------------------------------------- sparsification

QUARTERS = (0.0, 0.25, 0.5, 0.75)


def one_image(values) -> torch.Tensor:
    """A (1, 1, 1, N) map holding ``values``."""
    return torch.tensor(values, dtype=torch.float64).reshape(1, 1, 1, -1)


def test_reversed_ranking_curves_and_areas_by_hand():
    error = one_image([1.0, 2.0, 3.0, 4.0])
    reversed_u = one_image([4.0, 3.0, 2.0, 1.0])             # most confident where the error is largest
    # removing 0, 1, 2, 3 of 4 pixels: model keeps the largest errors, oracle the smallest
    model = M.sparsification_curve(error, reversed_u, fractions=QUARTERS)
    oracle = M.sparsification_curve(error, error, fractions=QUARTERS)
    torch.testing.assert_close(model, torch.tensor([[2.5, 3.0, 3.5, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(oracle, torch.tensor([[2.5, 2.0, 1.5, 1.0]], dtype=torch.float64))
    # trapezoids over [0, 1] closed by (1, 0): model 0.25 (2.75 + 3.25 + 3.75 + 2) = 2.9375,
    # oracle 0.25 (2.25 + 1.75 + 1.25 + 0.5) = 1.4375, random 0.25 (3 * 2.5 + 1.25) = 2.1875
    assert M.ause(error, reversed_u, fractions=QUARTERS) == pytest.approx(1.5)
    assert M.aurg(error, reversed_u, fractions=QUARTERS) == pytest.approx(2.1875 - 2.9375)
    assert M.aurg(error, error, fractions=QUARTERS) == pytest.approx(2.1875 - 1.4375)


def test_rms_reduction_by_hand():
    error = one_image([1.0, 2.0, 3.0, 4.0])
    model = M.sparsification_curve(error, one_image([4.0, 3.0, 2.0, 1.0]), fractions=QUARTERS, reduce="rms")
    want = torch.tensor([[math.sqrt(30 / 4), math.sqrt(29 / 3), math.sqrt(25 / 2), 4.0]], dtype=torch.float64)
    torch.testing.assert_close(model, want)


def test_fractional_removal_and_ties_in_expectation():
    error = one_image([1.0, 2.0, 3.0, 4.0])
    # 0.1 * 4 = 0.4 pixel of the error-4 pixel removed: (10 - 0.4 * 4) / 3.6
    curve = M.sparsification_curve(error, error, fractions=(0.0, 0.1))
    assert curve[0, 1].item() == pytest.approx(8.4 / 3.6)
    # pixels 1 and 2 tie for most uncertain: removing one leaves mean(2,3,4) = 3 or mean(1,3,4) = 8/3
    tied = M.sparsification_curve(error, one_image([1.0, 1.0, 0.0, 0.0]), fractions=QUARTERS)
    assert tied[0, 1].item() == pytest.approx((3 + 8 / 3) / 2)
    assert tied[0, 2].item() == pytest.approx(3.5)             # the whole tie group is gone


def test_perfect_ranking_has_zero_ause_and_positive_aurg():
    g = torch.Generator().manual_seed(3)
    error = torch.rand(3, 1, 10, 10, generator=g, dtype=torch.float64)
    for reduce in ("mean", "rms"):
        assert M.ause(error, error, reduce=reduce) == pytest.approx(0.0, abs=1e-15)
        # any increasing function of the error ranks the same way
        assert M.ause(error, 2 * error ** 2 + 1, reduce=reduce) == pytest.approx(0.0, abs=1e-15)
        assert M.aurg(error, error, reduce=reduce) > 0.1


def test_constant_uncertainty_is_the_random_curve():
    error = 0.5 + 9.5 * torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(4),
                                   dtype=torch.float64)
    flat = torch.ones_like(error)
    curve = M.sparsification_curve(error, flat)
    torch.testing.assert_close(curve, error.flatten(1).mean(1, keepdim=True).expand_as(curve))
    # exactly 0 in exact arithmetic; float64 rounding of the group means leaves ~1e-16
    assert M.aurg(error, flat) == pytest.approx(0.0, abs=1e-12)
    assert M.aurg(error, flat, reduce="rms") == pytest.approx(0.0, abs=1e-12)


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
    f = torch.tensor(M.DEFAULT_FRACTIONS, dtype=torch.float64)
    x = torch.cat([f, torch.ones(1, dtype=torch.float64)])
    w = torch.zeros_like(x)
    w[:-1] += x.diff() / 2
    w[1:] += x.diff() / 2
    m = n - f * n
    sd_bounds = [(w[:-1] * e.std(unbiased=False) * ((n - m) / (m * (n - 1))).sqrt()).sum().item()
                 for e in error.flatten(1)]
    bound = sum(sd_bounds) / b / math.sqrt(b)
    value = M.aurg(error, noise)
    assert abs(value) < 4 * bound, (value, bound)
    assert M.aurg(error, error) > 20 * bound                   # the bound has power


def test_mask_drops_pixels_from_sparsification():
    error = one_image([1.0, 2.0, 3.0, 4.0, 100.0])
    u = one_image([4.0, 3.0, 2.0, 1.0, math.nan])
    mask = one_image([1, 1, 1, 1, 0]).bool()
    assert M.ause(error, u, mask, fractions=QUARTERS) == pytest.approx(1.5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(fractions=(0.1, 0.5)), ValueError, "from 0"),
    (dict(fractions=(0.0, 0.5, 0.5)), ValueError, "increase strictly"),
    (dict(fractions=(0.0, 1.0)), ValueError, "below 1"),
    (dict(reduce="median"), ValueError, "reduce must be"),
])
def test_bad_sparsification_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        M.ause(one_image([1.0, 2.0]), one_image([1.0, 2.0]), **kwargs)


def test_bad_sparsification_inputs_raise():
    with pytest.raises(ValueError, match="non-negative"):
        M.ause(one_image([-1.0, 2.0]), one_image([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"error shape \(1, 1, 1, 2\) does not match uncertainty"):
        M.ause(one_image([1.0, 2.0]), one_image([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="error has 1 non-finite"):
        M.ause(one_image([math.nan, 2.0]), one_image([1.0, 2.0]))
    with pytest.raises(ValueError, match="uncertainty has 1 non-finite"):
        M.ause(one_image([1.0, 2.0]), one_image([math.inf, 2.0]))
    with pytest.raises(ValueError, match="leading image axis"):
        M.ause(torch.ones(4, 4), torch.ones(4, 4))
    with pytest.raises(ValueError, match="no valid pixel"):
        M.ause(one_image([1.0, 2.0]), one_image([1.0, 2.0]), one_image([0, 0]).bool())


def test_depth_kit_reexports_the_core_sparsification():
    """bc.depth.metrics.ause etc. stay part of the depth kit's API: the core objects themselves."""
    for name in ("DEFAULT_FRACTIONS", "sparsification_curve", "ause", "aurg"):
        assert getattr(bc.depth.metrics, name) is getattr(M, name) is getattr(bc.depth, name)
        assert name in bc.depth.metrics.__all__
