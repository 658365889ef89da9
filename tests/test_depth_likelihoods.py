"""bc.depth.DepthLikelihood against torch.distributions and closed-form log-normal moments."""
import math
import subprocess
import sys

import pytest
import torch
from torch.distributions import (ExpTransform, Laplace, LogNormal, Normal,
                                 TransformedDistribution)

import bayes_colora as bc
from bayes_colora.depth import DepthLikelihood
from bayes_colora.likelihoods import likelihood_from_config

B, H, W = 2, 3, 4


def depth_target(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Depths in [0.5, 5] m with holes (0, NaN, inf, a depth below min_depth) and their mask."""
    g = torch.Generator().manual_seed(seed)
    y = 0.5 + 4.5 * torch.rand(B, 1, H, W, generator=g, dtype=torch.float64)
    y[0, 0, 0, 0], y[0, 0, 1, 2], y[1, 0, 2, 3], y[1, 0, 0, 1] = 0.0, math.nan, math.inf, 5e-4
    valid = torch.ones_like(y, dtype=torch.bool)
    valid[0, 0, 0, 0] = valid[0, 0, 1, 2] = valid[1, 0, 2, 3] = valid[1, 0, 0, 1] = False
    return y, valid


def network_output(lik: DepthLikelihood, lead: tuple[int, ...] = (), seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(*lead, B, lik.channels, H, W, generator=g, dtype=torch.float64)
    if lik.space == "depth":
        out[..., 0, :, :] = 2.0 + out[..., 0, :, :]
    if lik.heteroscedastic:
        out[..., 1, :, :] = -2.0 + 0.5 * out[..., 1, :, :]
    return out


def reference(lik: DepthLikelihood, out: torch.Tensor, y: torch.Tensor) -> torch.distributions.Distribution:
    """The torch distribution of depth y per pixel that ``lik`` claims to be."""
    mu = out[..., :1, :, :]
    var = out[..., 1:, :, :].exp() if lik.heteroscedastic else lik.sigma.double() ** 2 * torch.ones_like(mu)
    base = Normal(mu, var.sqrt()) if lik.dist == "gaussian" else Laplace(mu, (var / 2).sqrt())
    return base if lik.space == "depth" else TransformedDistribution(base, [ExpTransform()])


LIKELIHOODS = [dict(dist=d, space=s, **noise)
               for d in ("gaussian", "laplace") for s in ("depth", "log")
               for noise in ({"sigma": 0.3}, {"sigma": 0.7, "learn_sigma": True}, {"heteroscedastic": True})]


@pytest.mark.parametrize("kwargs", LIKELIHOODS, ids=lambda k: "-".join(map(str, k.values())))
def test_log_prob_is_the_torch_density_summed_over_valid_pixels(kwargs):
    lik = DepthLikelihood(**kwargs).double()
    y, valid = depth_target()
    out = network_output(lik, lead=(3,))                       # 3 posterior samples lead
    y_ref = torch.where(valid, y, torch.ones_like(y))
    want = torch.where(valid, reference(lik, out, y_ref).log_prob(y_ref), torch.zeros_like(y_ref))
    got = lik.log_prob(out, y)
    assert got.shape == (3, B)
    torch.testing.assert_close(got, want.sum((-3, -2, -1)), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(lik.log_prob(out[1], y), got[1], rtol=1e-12, atol=1e-12)


def test_log_space_gaussian_is_the_log_normal_density_of_depth():
    lik = DepthLikelihood(space="log", sigma=0.2).double()
    y, valid = depth_target()
    out = network_output(lik)
    want = LogNormal(out, 0.2).log_prob(torch.where(valid, y, torch.ones_like(y)))  # includes -log y
    torch.testing.assert_close(lik.log_prob(out, y), want.where(valid, 0.0).sum((1, 2, 3)))


@pytest.mark.parametrize("kwargs", [dict(dist="laplace", space="log", heteroscedastic=True),
                                    dict(dist="gaussian", space="depth", sigma=0.5)])
def test_invalid_pixels_neither_change_log_prob_nor_get_gradient(kwargs):
    lik = DepthLikelihood(**kwargs).double()
    y, valid = depth_target()
    out = network_output(lik)
    out[0, 0, 0, 0] = math.inf                                # a diverged prediction at a hole
    out.requires_grad_(True)
    lp = lik.log_prob(out, y)
    changed = out.detach().clone()
    changed[~valid.expand_as(changed)] = 1e6 * torch.randn(int((~valid).sum()) * lik.channels,
                                                           dtype=torch.float64)
    assert torch.isfinite(lp).all()
    assert torch.equal(lik.log_prob(changed, y), lp.detach())
    lp.sum().backward()
    assert torch.isfinite(out.grad).all()
    assert (out.grad[~valid.expand_as(out)] == 0).all()
    assert (out.grad[:, :1][valid] != 0).all()                # and valid pixels do get gradient


@pytest.mark.parametrize("space", ["depth", "log"])
def test_learned_sigma_gradient_ignores_holes(space):
    lik = DepthLikelihood(space=space, sigma=0.5, learn_sigma=True).double()
    y, valid = depth_target()                                 # holes: 0, NaN, inf, < min_depth
    out = network_output(lik)
    lik.log_prob(out, y).sum().backward()
    # d/d log sigma of sum_valid -0.5 [r^2 / sigma^2 + 2 log sigma] = sum_valid (r^2 / sigma^2 - 1)
    z = torch.where(valid, y, torch.ones_like(y))
    r = (z.log() if space == "log" else z) - out
    want = ((r ** 2 / 0.25 - 1) * valid).sum()
    torch.testing.assert_close(lik.log_sigma.grad, want)


def test_min_depth_sets_which_depths_count():
    y = torch.tensor([0.0, 0.05, 0.2, 1.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    out = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    per_pixel = Normal(0.0, 1.0).log_prob(y)
    for min_depth in (0.0, 0.1):
        want = per_pixel[y > min_depth].sum().item()
        assert DepthLikelihood(min_depth=min_depth).log_prob(out, y).item() == pytest.approx(want)


@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
def test_log_space_moments_are_the_closed_form_log_normal_moments(dist):
    lik = DepthLikelihood(dist=dist, space="log", heteroscedastic=True).double()
    outs = network_output(lik, lead=(5,))
    mu, var = outs[:, :, :1], outs[:, :, 1:].exp()
    ln = LogNormal(mu, var.sqrt())                             # mean exp(mu + v/2), var (e^v - 1) e^{2mu+v}
    m = lik.moments(outs)
    torch.testing.assert_close(m["mean"], ln.mean.mean(0))
    torch.testing.assert_close(m["aleatoric"], ln.variance.mean(0))
    torch.testing.assert_close(m["epistemic"], ln.mean.var(0, unbiased=False))
    torch.testing.assert_close(m["total"], m["aleatoric"] + m["epistemic"])
    assert m["mean"].shape == (B, 1, H, W)


def test_log_laplace_moment_matching_agrees_with_the_exact_mean_to_order_b4():
    # exact log-Laplace mean e^mu / (1 - b^2); matched e^{mu + b^2}; ratio 1 - b^4/2 + O(b^6)
    b = 0.1
    lik = DepthLikelihood(dist="laplace", space="log", sigma=math.sqrt(2) * b).double()
    mu = torch.full((1, 1, 1, 1, 1), 0.7, dtype=torch.float64)
    exact = math.exp(0.7) / (1 - b ** 2)
    rel = lik.moments(mu)["mean"].item() / exact - 1
    assert abs(rel + b ** 4 / 2) < b ** 6


def test_depth_space_moments_split_total_variance():
    lik = DepthLikelihood(dist="laplace", sigma=0.4).double()
    outs = network_output(lik, lead=(4,))
    m = lik.moments(outs)
    torch.testing.assert_close(m["mean"], outs.mean(0))
    torch.testing.assert_close(m["aleatoric"], torch.full_like(m["mean"], 0.16))
    torch.testing.assert_close(m["epistemic"], outs.var(0, unbiased=False))
    assert (lik.moments(outs[:1])["epistemic"] == 0).all()     # one sample: no epistemic part


def test_check_target_names_both_shapes():
    lik = DepthLikelihood(heteroscedastic=True)
    out = torch.zeros(B, 2, H, W)
    lik.check_target(out, torch.ones(B, 1, H, W))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 1, 3, 4\)"):
        lik.check_target(out, torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\), got \(2, 1, 3, 4\)"):
        lik.check_target(torch.zeros(B, 1, H, W), torch.ones(B, 1, H, W))
    assert lik.mean_output(out).shape == (B, 1, H, W)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dist="student"), "dist must be one of"),
    (dict(space="inverse"), "space must be one of"),
    (dict(sigma=0.0), "sigma must be a positive float"),
    (dict(min_depth=-1.0), "min_depth must be a finite float >= 0"),
    (dict(learn_sigma=True, heteroscedastic=True), "not both"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepthLikelihood(**kwargs)


def test_heteroscedastic_has_no_single_sigma():
    with pytest.raises(ValueError, match="no single sigma"):
        DepthLikelihood(heteroscedastic=True).sigma


def test_config_round_trip_and_posterior_save_load(tmp_path):
    lik = DepthLikelihood(dist="laplace", space="log", sigma=0.3, learn_sigma=True, min_depth=0.01)
    with torch.no_grad():
        lik.log_sigma.fill_(math.log(0.45))                   # as if fit_map had trained it
    rebuilt = likelihood_from_config(lik.config())
    assert type(rebuilt) is DepthLikelihood and rebuilt.config().keys() == lik.config().keys()
    post = bc.DiracPosterior(torch.zeros(3), likelihood=lik)
    post.save(tmp_path / "post.pt")
    loaded = bc.load_posterior(tmp_path / "post.pt").likelihood
    assert loaded.config() == lik.config()
    assert float(loaded.sigma.detach()) == pytest.approx(0.45)
    y, _ = depth_target()
    out = network_output(lik).float()
    torch.testing.assert_close(loaded.log_prob(out, y.float()), lik.log_prob(out, y.float()))
    # a fresh process that does not import bayes_colora.depth itself still rebuilds the likelihood
    code = ("import bayes_colora as bc; "
            f"print(type(bc.load_posterior({str(tmp_path / 'post.pt')!r}).likelihood).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "DepthLikelihood", result.stderr
