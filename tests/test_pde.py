"""PDE kit: the Burgers solver against Cole-Hopf, Neural Galerkin against closed forms and the
solver, right-hand sides against hand derivatives, the HDF5 loader on a file written here, the
reduced model's shapes and periodicity, offline training, and the sensor posterior against the
closed-form Gaussian posterior of a model linear in alpha."""
from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

import bayes_colora as bc
from bayes_colora import pde


# ------------------------------------------------------------------ solver
def test_burgers_solver_matches_cole_hopf_at_fourth_order():
    x = torch.arange(64, dtype=torch.float64) * 2 * math.pi / 64
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    exact = pde.burgers_cole_hopf(x, t, nu=0.5)
    errs = [(pde.burgers_1d(exact[0], 0.5, t, dt=dt) - exact).abs().max() for dt in (0.1, 0.05)]
    order = math.log2(errs[0] / errs[1])
    assert 3.5 < order < 4.5, f"observed order {order}, RK4 gives 4"
    fine = (pde.burgers_1d(exact[0], 0.5, t, dt=0.01) - exact).abs().max()
    assert fine < errs[1] / 16 ** 2 * 2          # two more halvings of the order-4 error (x2 slack)


def test_burgers_solver_conserves_the_mean():
    x = torch.arange(128, dtype=torch.float64) * 2 * math.pi / 128
    u = pde.burgers_1d(0.5 + torch.sin(x), 0.05, torch.linspace(0, 2, 5), dt=2e-3)
    # d/dt mean(u) = -mean((u^2/2)_x) + nu mean(u_xx) = 0 on a periodic domain
    torch.testing.assert_close(u.mean(1), torch.full((5,), 0.5, dtype=torch.float64), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- Galerkin
def _sine_field(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return a[0] * torch.sin(x)


def test_galerkin_system_closed_form_and_exact_decay():
    # u = a sin x: u u_x = a^2 sin(2x)/2 is orthogonal to sin x, so M = 1/2, F = -nu a / 2 and
    # a(t) = a0 exp(-nu t) exactly (the uniform grid integrates these trigonometric products exactly)
    x = (torch.arange(64, dtype=torch.float64) * 2 * math.pi / 64)[:, None]
    eq, a0 = pde.Burgers1D(0.3), torch.tensor([1.2], dtype=torch.float64)
    m, f = pde.galerkin_system(_sine_field, eq, a0, x)
    torch.testing.assert_close(m, torch.tensor([[0.5]], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f, torch.tensor([-0.3 * 1.2 / 2], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    a = pde.neural_galerkin(_sine_field, eq, a0, x, t, dt=0.05, reg=0.0, progress=False)
    exact = 1.2 * torch.exp(-0.3 * t)
    # RK4 relative error per step (nu h)^5 / 120 = 6e-12, 40 steps: 3e-10 (reg=0: no Tikhonov shift,
    # which would change the velocity by the relative factor reg)
    torch.testing.assert_close(a[:, 0], exact, rtol=1e-9, atol=0)
    euler = pde.neural_galerkin(_sine_field, eq, a0, x, t, dt=0.05, scheme="euler", progress=False)
    assert (euler[-1, 0] - exact[-1]).abs() > 1e-4       # first order: visibly worse


def test_galerkin_on_fourier_modes_matches_the_spectral_solver():
    n, k_max, nu = 96, 12, 0.2
    x = (torch.arange(n, dtype=torch.float64) * 2 * math.pi / n)[:, None]
    ks = torch.arange(1, k_max + 1, dtype=torch.float64)

    def field(pts: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return a[0] + (a[1:k_max + 1] * torch.cos(pts * ks)).sum(-1, keepdim=True) + \
            (a[k_max + 1:] * torch.sin(pts * ks)).sum(-1, keepdim=True)

    a0 = torch.zeros(2 * k_max + 1, dtype=torch.float64)
    a0[0], a0[k_max + 1] = 0.5, 1.0                        # u0 = 0.5 + sin x
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    a = pde.neural_galerkin(field, pde.Burgers1D(nu), a0, x, t, dt=0.01, progress=False)
    ref = pde.burgers_1d(0.5 + torch.sin(x[:, 0]), nu, t, dt=1e-3)
    gal = torch.stack([field(x, ai)[:, 0] for ai in a])
    # the Galerkin solution is the spectral solution truncated at k_max: its error is of the
    # size of the reference's Fourier tail beyond k_max
    spec = torch.fft.rfft(ref[-1])
    spec[:k_max + 1] = 0
    tail = torch.fft.irfft(spec, n=n).abs().max()
    assert (gal - ref).abs().max() < 10 * tail + 1e-9


def test_rhs_match_hand_derivatives():
    x = torch.linspace(0.1, 2.0, 7, dtype=torch.float64)[:, None]
    u_fn = lambda p: torch.sin(p) + 0.5  # noqa: E731
    u, f = pde.Burgers1D(0.1).rhs(x, u_fn)
    s, c = torch.sin(x), torch.cos(x)
    torch.testing.assert_close(f, -(s + 0.5) * c - 0.1 * s)
    x2 = torch.rand(5, 2, dtype=torch.float64)
    _, f2 = pde.Burgers2D(0.01).rhs(x2, lambda p: (p[:, :1] ** 2) * p[:, 1:])   # u = x^2 y
    xx, yy = x2[:, :1], x2[:, 1:]
    torch.testing.assert_close(f2, -(xx ** 2 * yy) * (2 * xx * yy + xx ** 2) + 0.01 * 2 * yy)
    eq = pde.RDE(s=2.5)
    w, fr = eq.rhs(x, lambda p: torch.cat([torch.ones_like(p), torch.zeros_like(p)], 1))  # u = 1, lambda = 0
    omega = math.exp((1 - 1.1) / 0.3)
    expect = torch.tensor([1 * omega - 0.15, omega], dtype=torch.float64).expand(7, 2)
    torch.testing.assert_close(fr, expect)
    with pytest.raises(ValueError, match=r"x has shape \(7, 1\), expected \(N, 2\)"):
        pde.Burgers2D(0.1).rhs(x, u_fn)


# -------------------------------------------------------------------- data
def _write_layout(path, u: np.ndarray, t: np.ndarray, xs: list[np.ndarray], mu: float) -> None:
    """The layout of data/README.md, written with h5py directly (independent of save_trajectory)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("u", data=u)
        names = ["q", "t"] + [f"x{i}" for i in range(len(xs))]
        for i, (name, scale) in enumerate(zip(names, [np.arange(u.shape[0]), t, *xs])):
            f[name] = scale
            f[name].make_scale(name)
            f["u"].dims[i].attach_scale(f[name])
            f["u"].dims[i].label = name
        f.attrs.update({"mu": mu, "equation": "burgers", "input_dim": len(xs), "output_dim": u.shape[0]})


def test_hdf5_loader_reads_the_documented_layout(tmp_path):
    rng = np.random.default_rng(0)
    u = rng.standard_normal((1, 3, 4, 5)).astype(np.float32)
    t, x0, x1 = np.array([0.0, 0.5, 1.0]), np.linspace(0, 1, 4), np.linspace(0, 1, 5)
    for mu in (0.002, 0.004, 0.003):
        _write_layout(tmp_path / f"b_{mu}.hdf5", u * mu, t, [x0, x1], mu)
    tr = pde.load_trajectory(tmp_path / "b_0.002.hdf5")
    assert tr.u.shape == (3, 4, 5, 1) and tr.mu == 0.002 and tr.equation == "burgers"
    np.testing.assert_allclose(tr.u[..., 0].numpy(), u[0] * 0.002, rtol=1e-6)
    assert tr.points.shape == (20, 2)
    np.testing.assert_allclose(tr.points[7].numpy(), [x0[1], x1[2]], rtol=1e-6)   # row-major grid
    np.testing.assert_allclose(tr.flat[2, 7, 0].numpy(), u[0, 2, 1, 2] * 0.002, rtol=1e-6)
    trajs = pde.load_folder(tmp_path)
    assert [tr.mu for tr in trajs] == [0.002, 0.003, 0.004]
    train, test = pde.split_by_mu(trajs, [0.003])
    assert [tr.mu for tr in train] == [0.002, 0.004] and test[0].mu == 0.003
    snaps = pde.Snapshots.from_trajectories(train)
    assert snaps.u.shape == (6, 20, 1)
    torch.testing.assert_close(snaps.tmu[4], torch.tensor([0.5, 0.004]))
    pde.save_trajectory(tmp_path / "copy" / "c.hdf5", tr.subsample(space=2))
    back = pde.load_trajectory(tmp_path / "copy" / "c.hdf5")
    torch.testing.assert_close(back.u, tr.u[:, ::2, ::2])
    with pytest.raises(ValueError, match=r"test parameters \[0.005\] found \[\]"):
        pde.split_by_mu(trajs, [0.005])


# ------------------------------------------------------------------- model
def test_reduced_model_shapes_periodicity_and_parameter_count():
    m = pde.ReducedModel.build(1, 2, width=8, depth=3, rank=2, period=2 * math.pi, hyper_width=6)
    assert m.n_online == 3                                   # one alpha per linear layer
    x, tmu = torch.rand(11, 1) * 6, torch.rand(4, 2)
    out = m(x, tmu)
    assert out.shape == (4, 11, 2)
    loop = torch.stack([m.field(x, a) for a in m.alpha(tmu)])
    torch.testing.assert_close(out, loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.field(x + 2 * math.pi, m.alpha(tmu)[0]), loop[0], rtol=1e-4, atol=1e-5)
    # embedding 3*8, layers 8*8+8 (x2, one of them 8->2: 16+2), factors r(in+out) per layer, alphas
    net = 24 + (72 + 2 * 16 + 1) * 2 + (18 + 2 * 10 + 1)
    assert pde.n_parameters(m.sub.model) == net
    w = pde.baseline_width(500, 1, 2, 3)
    assert pde.n_parameters(pde.ConcatBaseline(1, 2, w, 3)) == 3 * w + (w + 2) * w + w + w * w + w + 2 * w + 2


@pytest.mark.parametrize("per", ["layer", "rank"])
@pytest.mark.parametrize("embed_activation", [False, True])
def test_batched_field_is_the_subspace_call(per, embed_activation):
    # the training path (effective weights W + A diag(c) B, one bmm per layer) against the
    # vmap'ed functional subspace call, also with a non-zero reference alpha_ref
    m = pde.ReducedModel.build(2, 2, width=9, depth=4, rank=3, per=per, period=2.0, hyper_width=5,
                               embed_activation=embed_activation).double()
    x = torch.rand(13, 2, dtype=torch.float64)
    alpha = torch.randn(6, m.n_online, dtype=torch.float64)
    assert m._direct_layers() is not None
    torch.testing.assert_close(m.field(x, alpha), m.sub(x, theta=alpha), rtol=1e-12, atol=1e-12)
    bc.adapters.continuous.set_alpha_reference(m.sub.model, torch.randn(m.n_online, dtype=torch.float64))
    torch.testing.assert_close(m.batched_field(x, alpha), m.sub(x, theta=alpha), rtol=1e-12, atol=1e-12)
    # the baseline's split first layer W [z; s] = W_z z + W_s s against the concatenation
    b = pde.ConcatBaseline(2, 2, 7, 3, 2.0, embed_activation).double()
    tmu = torch.rand(4, 2, dtype=torch.float64)
    z, s = b.act(b.embed(x)), (tmu - b.shift) / b.scale
    h = torch.cat([z.expand(4, *z.shape), s[:, None, :].expand(-1, 13, -1)], -1)
    for i, layer in enumerate(b.layers):
        h = layer(h) if i == len(b.layers) - 1 else torch.nn.functional.silu(layer(h))
    torch.testing.assert_close(b(x, tmu), h, rtol=1e-12, atol=1e-12)


def test_relative_errors_and_offline_training_reduce_the_loss():
    true = torch.randn(3, 10, 2)
    torch.testing.assert_close(pde.relative_errors(1.1 * true, true), torch.full((3,), 0.1))
    traj = pde.burgers_trajectories([0.1], n_x=32, n_t=11, t_end=1.0)
    data = pde.Snapshots.from_trajectories(traj)
    m = pde.ReducedModel.build(1, 1, width=8, depth=3, rank=2, hyper_width=6)
    before = float(pde.relative_errors(pde.predict_snapshots(m, data.x, data.tmu), data.u).mean())
    hist = pde.train_offline(m, data, steps=150, lr=1e-2, batch=11, progress=False, log_every=50)
    after = float(pde.relative_errors(pde.predict_snapshots(m, data.x, data.tmu), data.u).mean())
    assert after < before / 3 and len(hist) == 3
    assert all(not p.requires_grad for n, p in m.sub.model.named_parameters() if not n.endswith("alpha"))


# ------------------------------------------------------------- uncertainty
def test_sensor_posterior_is_the_closed_form_gaussian_for_a_model_linear_in_alpha():
    torch.manual_seed(0)
    net = pde.CoordinateNet(1, 1, width=6, depth=2).double()
    sub = bc.Subspace.from_model(net, bc.ContinuousLoRA(rank=2, targets=r"layers\.1$", seed=0))
    assert sub.dim == 1                                      # u = f0(x) + alpha g(x): linear in alpha
    x_obs = torch.linspace(0, 6, 9, dtype=torch.float64)[:, None]
    a_ref = torch.tensor([0.4], dtype=torch.float64)
    with torch.no_grad():
        f0 = sub(x_obs, theta=torch.zeros(1, dtype=torch.float64))[:, 0]
        g = sub(x_obs, theta=torch.ones(1, dtype=torch.float64))[:, 0] - f0
        y = (f0 + 0.9 * g + 0.05 * torch.randn(9, dtype=torch.float64))[:, None]
    sigma, s = 0.05, 0.3
    post, pred = pde.sensor_posterior(sub, a_ref, x_obs, y, x_obs, sigma, "laplace", prior_scale=s,
                                      map_steps=2000, lr=5e-2)
    # theta = alpha - a_ref ~ N(0, s^2); y = f0 + (a_ref + theta) g + e
    prec = (g @ g) / sigma ** 2 + 1 / s ** 2
    mean = (g @ (y[:, 0] - f0 - a_ref * g)) / sigma ** 2 / prec
    torch.testing.assert_close(post.mean, mean.reshape(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(post.covariance, (1 / prec).reshape(1, 1), rtol=1e-6, atol=0)
    # linearised predictive: epistemic variance g^2 / prec at every point (Monte Carlo, 64 samples)
    ratio = pred.epistemic[:, 0] / (g ** 2 / prec)
    assert ((ratio - 1).abs() < 0.5).all()
    assert torch.equal(sub.theta, torch.zeros(1, dtype=torch.float64))       # restored
    with pytest.raises(ValueError, match="needs a prior_scale"):
        pde.sensor_posterior(sub, a_ref, x_obs, y, x_obs, sigma, "nuts")


def test_factor_subspace_and_laplace_over_the_adapter_factors():
    traj = pde.burgers_trajectories([0.1], n_x=16, n_t=6, t_end=0.5)
    data = pde.Snapshots.from_trajectories(traj)
    m = pde.ReducedModel.build(1, 1, width=4, depth=2, rank=2, hyper_width=4)
    m.set_normalisation(data.tmu)
    with torch.no_grad():
        ref = m(data.x, data.tmu)
    fsub, post = pde.factor_laplace(m, data, sigma=0.1, n_points=None, progress=False)
    # A (out, r) and B (r, in) of layers 4->4 and 4->1: 2 (4 + 4) + 2 (1 + 4)
    assert fsub.dim == 26 and fsub.dtype == torch.float64
    assert all(n.endswith(("lora_A", "lora_B")) for n in fsub.param_names)
    torch.testing.assert_close(fsub((data.x.double(), data.tmu.double())).float(), ref, rtol=1e-5, atol=1e-6)
    # the model itself is untouched: still float32, its alphas still the alpha subspace
    assert m.sub.dtype == torch.float32 and m.sub.param_names[0].endswith("alpha")
    # Laplace: precision = GGN + delta I with delta > 0 -> covariance smaller than the prior's
    assert post.history[0]["prior_precision"] > 0
    assert (post.variance < 1 / post.history[0]["prior_precision"] + 1e-12).all()


def test_training_stopped_by_the_time_budget_still_reports_its_steps():
    data = pde.Snapshots.from_trajectories(pde.burgers_trajectories([0.1], n_x=16, n_t=6, t_end=0.5))
    m = pde.ReducedModel.build(1, 1, width=4, depth=2, rank=2, hyper_width=4)
    hist = pde.train_offline(m, data, steps=10_000, batch=3, max_seconds=0.3, progress=False, log_every=10_000)
    assert len(hist) == 1 and 0 < hist[0]["step"] < 10_000 and hist[0]["seconds"] >= 0.3
    hist = pde.train_offline(m, data, steps=7, batch=3, progress=False, log_every=3)
    assert [h["step"] for h in hist] == [3, 6, 7]
