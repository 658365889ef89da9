"""KFAC Laplace (``hessian="kron"``): exactness for one location, laplace-torch's ``KronLaplace``
as a reference (MLP, tokens, Conv2d), the Monte-Carlo gradient factor against its expectation,
conv patches against explicit slicing, the diagonal blocks against the exact GGN diagonal, and the
posterior's algebra, persistence and prior tuning."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayes_colora as bc
from bayes_colora.inference.ggn import ggn_diag, ggn_full
from bayes_colora.inference.kron import ggn_kron

SIGMA = 0.5
LIK = bc.Gaussian(sigma=SIGMA)
PRIOR = bc.NormalPrior(0.5)  # precision 4
SCALE = 2.0  # LoRA alpha / rank with rank 2, alpha 4: the scale enters both gradient factors


def mlp_subspace(out=1, spec=None, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, out)).double()
    sub = bc.Subspace.from_model(model, spec or bc.LoRA(rank=2, alpha=4.0))
    sub.theta = 0.3 * torch.randn(sub.dim, dtype=torch.float64)  # a generic point, B != 0
    return sub


def block(mat, b):
    s = slice(b.offset, b.offset + b.size)
    return mat[s, s]


# ----------------------------------------------------------------------------- exactness
def test_one_example_one_token_gives_the_exact_ggn_blocks():
    """One location: G_P = (g g^T) kron (a a^T) exactly; one output: z^2 = 1, any probe count."""
    sub = mlp_subspace()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(1, 3, generator=g, dtype=torch.float64),
             torch.randn(1, 1, generator=g, dtype=torch.float64))]
    exact, _ = ggn_full(sub, data, LIK, sub.theta)
    kron = ggn_kron(sub, data, LIK, sub.theta, probes=3, generator=torch.Generator().manual_seed(0))
    assert [b.name for b in kron.blocks] == sub.param_names and kron.diag_index.numel() == 0
    for b in kron.blocks:
        torch.testing.assert_close(torch.kron(b.grad_factor, b.input_factor), block(exact, b),
                                   rtol=0, atol=1e-12 * block(exact, b).abs().max())
    # the posterior's precision is that block-diagonal GGN plus the prior
    post = bc.fit_laplace(sub, data, LIK, PRIOR, hessian="kron", progress=False)
    assert isinstance(post, bc.KronGaussianPosterior)
    torch.testing.assert_close(post.precision, kron.dense() + 4 * torch.eye(sub.dim, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- laplace-torch
class PlainLoRA(nn.Module):
    """``base(x) + s B(A(x))`` with A and B plain bias-free layers: what KronLaplace supports."""

    def __init__(self, base, lora_A, lora_B):
        super().__init__()
        self.base = base
        kw = {"bias": False, "dtype": lora_A.dtype}
        if isinstance(base, nn.Conv2d):  # A: the base conv's geometry with r outputs; B: 1 x 1
            self.A = nn.Conv2d(base.in_channels, lora_A.shape[0], base.kernel_size, base.stride,
                               base.padding, base.dilation, **kw)
            self.B = nn.Conv2d(lora_A.shape[0], lora_B.shape[0], 1, **kw)
        else:
            self.A = nn.Linear(lora_A.shape[1], lora_A.shape[0], **kw)
            self.B = nn.Linear(lora_B.shape[1], lora_B.shape[0], **kw)
        with torch.no_grad():
            self.A.weight.copy_(lora_A.reshape(self.A.weight.shape))
            self.B.weight.copy_(lora_B.reshape(self.B.weight.shape))

    def forward(self, x):
        return self.base(x) + SCALE * self.B(self.A(x))


class MeanTokens(nn.Module):
    def forward(self, h):
        return h.mean(1)


def reference_case(kind):
    """(bc model layers, input shape): scalar regression outputs, several locations per example
    for "tokens" (5 tokens) and "conv" (16 and 4 pixels; stride, padding, dilation)."""
    if kind == "mlp":
        return [nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)], (3,)
    if kind == "tokens":
        return [nn.Linear(3, 6), nn.Tanh(), MeanTokens(), nn.Linear(6, 1)], (5, 3)
    return [nn.Conv2d(2, 4, 3, padding=1, stride=2), nn.Tanh(), nn.Conv2d(4, 3, 2, dilation=2),
            nn.Flatten(), nn.Linear(12, 1)], (2, 8, 8)


@pytest.mark.parametrize("kind", ["mlp", "tokens", "conv"])
def test_kron_precision_matches_laplace_torch_kron_laplace(kind):
    from laplace import Laplace

    torch.manual_seed(0)
    layers, shape = reference_case(kind)
    model = nn.Sequential(*layers).double()
    base = copy.deepcopy(model)
    sub = bc.Subspace.from_model(model, bc.LoRA(rank=2, alpha=4.0, types=[nn.Linear, nn.Conv2d]))
    sub.theta = 0.3 * torch.randn(sub.dim, dtype=torch.float64)
    for p in base.parameters():
        p.requires_grad_(False)
    pieces = sub.unflatten(sub.theta)
    for name in {n.rsplit(".", 1)[0] for n in sub.param_names}:
        base[int(name)] = PlainLoRA(base[int(name)], pieces[f"{name}.lora_A"], pieces[f"{name}.lora_B"])
    # same parameter order: A then B per layer, layers in order
    assert [n for n, p in base.named_parameters() if p.requires_grad] == [
        n.replace("lora_A", "A.weight").replace("lora_B", "B.weight") for n in sub.param_names]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, *shape, generator=g, dtype=torch.float64)
    y = torch.randn(12, 1, generator=g, dtype=torch.float64)
    torch.testing.assert_close(base(x), sub(x), rtol=1e-12, atol=1e-14)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # equal batches: laplace-torch's sum of
    # per-batch factors then equals one full-batch KFAC
    ref = Laplace(base, "regression", subset_of_weights="all", hessian_structure="kron",
                  sigma_noise=SIGMA, prior_precision=4.0)
    ref.fit(loader)
    want = ref.posterior_precision.to_matrix()
    post = bc.fit_laplace(sub, loader, LIK, PRIOR, hessian="kron", progress=False)
    err = float((post.precision - want).norm() / want.norm())
    assert err < 1e-10, err


# --------------------------------------------------------------- Monte-Carlo factor
def test_categorical_gradient_factor_is_unbiased_within_its_monte_carlo_error():
    """``g_n = M_n z_n`` for each example's Rademacher ``z_n`` (3 classes): ``E[H] = sum M M^T``;
    ``Var[(M z)_a (M z)_b] = 2 sum_{i != j} K_ij^2`` with ``K = (m_a m_b^T + m_b m_a^T) / 2``."""
    sub = mlp_subspace(out=3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    m = 1000
    kron = ggn_kron(sub, [(x, y)], bc.Categorical(), sub.theta, probes=m,
                    generator=torch.Generator().manual_seed(0))
    p = sub.unflatten(sub.theta)
    net = sub.model
    s0 = net[0].base(x) + SCALE * x @ p["0.lora_A"].T @ p["0.lora_B"].T  # layer-0 output (8, 6)
    h = torch.tanh(s0)
    w2 = net[2].base.weight + SCALE * p["2.lora_B"] @ p["2.lora_A"]  # adapted last weight (3, 6)
    prob = sub(x).softmax(1)
    sq = prob.sqrt()
    root = torch.diag_embed(sq) - prob[:, :, None] * sq[:, None, :]  # L_n, L L^T = diag(p) - p p^T
    torch.testing.assert_close(root @ root.mT, torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :])
    jac0 = w2[None] * (1 - h ** 2)[:, None, :]  # d logits / d s0, (8, 3, 6)
    m_mats = {  # M_n per parameter: output gradients reaching it are M_n z_n
        "2.lora_B": SCALE * root,
        "2.lora_A": SCALE * p["2.lora_B"].T @ root,
        "0.lora_B": SCALE * jac0.mT @ root,
        "0.lora_A": SCALE * p["0.lora_B"].T @ jac0.mT @ root,
    }
    inputs = {"0.lora_A": x, "0.lora_B": x @ p["0.lora_A"].T, "2.lora_A": h, "2.lora_B": h @ p["2.lora_A"].T}
    for b in kron.blocks:
        mm = m_mats[b.name]
        want = (mm @ mm.mT).sum(0)
        k = 0.5 * (mm[:, :, None, :, None] * mm[:, None, :, None, :]
                   + mm[:, None, :, :, None] * mm[:, :, None, None, :])  # (n, a, b, i, j)
        off_diag = (k ** 2).sum((-1, -2)) - (k.diagonal(dim1=-2, dim2=-1) ** 2).sum(-1)
        sd = (2 * off_diag.sum(0) / m).sqrt()
        assert ((b.grad_factor - want).abs() <= 5 * sd + 1e-12).all(), b.name
        assert (sd > 0).any()  # a genuinely random estimate
        # the input factor is deterministic: the mean of a a^T over the 8 examples
        a = inputs[b.name]
        torch.testing.assert_close(b.input_factor, a.T @ a / 8, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------- conv factors
def explicit_patches(x, layer):
    """``(B, H' W', c_in kh kw)`` patches by slicing the padded input: the definition of a conv."""
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    xp = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    rows = [xp[:, :, i * sh: i * sh + span_h: dh, j * sw: j * sw + span_w: dw].flatten(1)
            for i in range(h_out) for j in range(w_out)]
    return torch.stack(rows, 1)


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2, padding_mode="reflect"),
    lambda: nn.Conv2d(2, 3, 4, padding="same", padding_mode="circular"),
    lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0)),
])
def test_conv_lora_factors_equal_explicit_patch_sums(conv):
    torch.manual_seed(0)
    layer = bc.Subspace.from_model(nn.Sequential(conv().double()), bc.LoRA(rank=2, alpha=4.0)).model[0]
    assert layer.kfac_parameters() == ("lora_A", "lora_B")
    params = {"lora_A": torch.randn_like(layer.lora_A), "lora_B": torch.randn_like(layer.lora_B)}
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    out = layer(x)
    patches = explicit_patches(x, layer.base_layer)  # (2, L, c_in kh kw)
    assert patches.shape[1] == out.shape[2] * out.shape[3]
    a = patches.reshape(-1, patches.shape[2])
    u = a @ params["lora_A"].T
    got = layer.kfac_input_factors(x, params)
    torch.testing.assert_close(got["lora_A"][0], a.T @ a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["lora_B"][0], u.T @ u, rtol=1e-12, atol=1e-12)
    assert got["lora_A"][1] == got["lora_B"][1] == a.shape[0]
    grad = torch.randn_like(out)
    rows = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])  # one row per output pixel
    gf = layer.kfac_grad_factors(grad, params)
    torch.testing.assert_close(gf["lora_B"], SCALE ** 2 * rows.T @ rows, rtol=1e-12, atol=1e-12)
    ga = SCALE * rows @ params["lora_B"]
    torch.testing.assert_close(gf["lora_A"], ga.T @ ga, rtol=1e-12, atol=1e-12)


def test_single_output_pixel_conv_is_exact_with_reflect_padding_and_stride():
    """One example and one output location of the adapted conv: its KFAC block is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(3, 1, 3, stride=2, padding=1, padding_mode="reflect")).double()
    sub = bc.Subspace.from_model(model, bc.LoRA(rank=2, alpha=4.0, targets=r"^2$"))
    sub.theta = 0.3 * torch.randn(sub.dim, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(1, 1, 2, 2, generator=g, dtype=torch.float64),
             torch.randn(1, 1, 1, 1, generator=g, dtype=torch.float64))]
    exact, _ = ggn_full(sub, data, LIK, sub.theta)
    for b in ggn_kron(sub, data, LIK, sub.theta).blocks:
        torch.testing.assert_close(torch.kron(b.grad_factor, b.input_factor), block(exact, b),
                                   rtol=0, atol=1e-12 * block(exact, b).abs().max())


# ------------------------------------------------------------------------ diagonal blocks
class GlobalMean(nn.Module):
    def forward(self, h):
        return h.mean((2, 3))


@pytest.mark.parametrize("case", ["bitfit_next_to_lora", "unsupported_convs"])
def test_other_entries_get_the_exact_diagonal_for_one_scalar_output_per_batch(case):
    """Batches of one example with one output: ``(J^T L z)^2 = (J^T e)^2 / sigma^2`` exactly."""
    torch.manual_seed(0)
    if case == "bitfit_next_to_lora":
        model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
        spec = [bc.BitFit(), bc.LoRA(rank=2, alpha=4.0)]
        x = torch.randn(5, 3, dtype=torch.float64)
    else:  # a grouped conv and a transposed conv: no Kronecker factors, every entry diagonal
        model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.ConvTranspose2d(4, 2, 2),
                              GlobalMean(), nn.Linear(2, 1)).double()
        spec = bc.LoRA(rank=2, alpha=4.0, types=[nn.Conv2d, nn.ConvTranspose2d])
        x = torch.randn(5, 2, 5, 5, dtype=torch.float64)
    sub = bc.Subspace.from_model(model, spec)
    sub.theta = 0.3 * torch.randn(sub.dim, dtype=torch.float64)
    y = torch.randn(5, 1, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, y), batch_size=1)
    exact, _ = ggn_diag(sub, loader, LIK, sub.theta)
    kron = ggn_kron(sub, loader, LIK, sub.theta, probes=2, generator=torch.Generator().manual_seed(0))
    kron_entries = sum(b.size for b in kron.blocks)
    assert kron_entries + kron.diag_index.numel() == sub.dim
    assert kron_entries == (0 if case == "unsupported_convs" else 6 + 12 + 12 + 2)  # A, B per layer
    torch.testing.assert_close(kron.diag, exact[kron.diag_index], rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------- posterior
def fitted(prior=PRIOR, **kw):
    """A posterior with Kronecker blocks (LoRA) and diagonal entries (BitFit), d = 39."""
    sub = mlp_subspace(spec=[bc.BitFit(), bc.LoRA(rank=2, alpha=4.0)])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, 1, generator=g, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    ggn = ggn_kron(sub, loader, LIK, sub.theta, probes=4, generator=torch.Generator().manual_seed(0))
    post = bc.fit_laplace(sub, loader, LIK, prior, hessian="kron", diag_probes=4, progress=False,
                          generator=torch.Generator().manual_seed(0), **kw)
    return sub, ggn, post


def test_posterior_algebra_sampling_and_save_load(tmp_path):
    sub, ggn, post = fitted()
    eye = torch.eye(sub.dim, dtype=torch.float64)
    assert len(post.blocks) == 4 and post.diag_index.numel() == 6 + 1
    torch.testing.assert_close(post.precision, ggn.dense() + 4 * eye, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(post.covariance, torch.linalg.inv(ggn.dense() + 4 * eye),
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(post.variance, post.covariance.diagonal(), rtol=1e-12, atol=0)
    torch.testing.assert_close(post.mean, sub.theta)
    n = 40000
    s = post.sample(n, generator=torch.Generator().manual_seed(1))
    c = post.covariance
    se = ((c.diagonal()[:, None] * c.diagonal()[None] + c ** 2) / n).sqrt()  # entrywise MC error
    assert ((torch.cov(s.T) - c).abs() < 5 * se).all()
    assert ((s.mean(0) - post.mean).abs() < 5 * (c.diagonal() / n).sqrt()).all()
    post.save(tmp_path / "kron.pt")
    back = bc.load_posterior(tmp_path / "kron.pt")
    assert isinstance(back, bc.KronGaussianPosterior)
    torch.testing.assert_close(back.sample(5, torch.Generator().manual_seed(2)),
                               post.sample(5, torch.Generator().manual_seed(2)), rtol=0, atol=0)
    assert back.history == post.history


def test_marglik_maximises_the_evidence_of_the_block_diagonal_ggn():
    sub, ggn, post = fitted(tune_prior="marglik")
    lam = torch.linalg.eigvalsh(ggn.dense()).clamp_min(0)  # independent of the factor eigenvalues
    sq = float((sub.theta ** 2).sum())
    ll = float(ggn.log_lik)

    def evidence(delta):
        log_det = float(torch.log(lam + delta).sum())
        return ll - 0.5 * delta * sq + 0.5 * sub.dim * math.log(delta) - 0.5 * log_det

    def slope(delta):  # d evidence / d delta
        return -0.5 * sq + 0.5 * sub.dim / delta - 0.5 * float((1 / (lam + delta)).sum())

    found = post.history[0]["prior_precision"]
    assert slope(found * (1 - 1e-4)) > 0 > slope(found * (1 + 1e-4))
    assert math.isclose(post.history[0]["log_marglik"], evidence(found), rel_tol=1e-9)
    eye = torch.eye(sub.dim, dtype=torch.float64)
    torch.testing.assert_close(post.precision, ggn.dense() + found * eye, rtol=1e-10, atol=1e-10)


def test_temperature_divides_the_kron_curvature():
    sub, ggn, post = fitted(temperature=10.0)
    eye = torch.eye(sub.dim, dtype=torch.float64)
    torch.testing.assert_close(post.precision, ggn.dense() / 10.0 + 4 * eye, rtol=1e-10, atol=1e-10)


def entries(sub, name):
    """The slice of theta that holds parameter ``name``."""
    i = sub.param_names.index(name)
    start = sum(sub.param_numels[:i])
    return slice(start, start + sub.param_numels[i])


def test_vector_prior_is_per_kron_block_and_per_entry_on_the_diagonal():
    sub = mlp_subspace(spec=[bc.BitFit(), bc.LoRA(rank=2, alpha=4.0)])
    scale = torch.full((sub.dim,), 0.5, dtype=torch.float64)
    for name in ("0.base.bias_delta", "2.base.bias_delta"):  # diagonal entries: any value each
        s = entries(sub, name)
        scale[s] = torch.linspace(0.2, 2.0, s.stop - s.start, dtype=torch.float64)
    scale[entries(sub, "0.lora_A")] = 0.25  # one LoRA block, constant on it
    prior = bc.NormalPrior(scale)
    _, ggn, post = fitted(prior=prior)
    want = ggn.dense() + torch.diag(prior.precision.double())  # the prior keeps float32 scales
    torch.testing.assert_close(post.precision, want, rtol=1e-10, atol=1e-10)
    scale[entries(sub, "0.lora_A").start] = 0.3  # now it varies inside a Kronecker block
    with pytest.raises(ValueError, match="one prior precision per Kronecker block.*0.lora_A"):
        fitted(prior=bc.NormalPrior(scale))


def test_kron_errors_name_the_fix():
    sub = mlp_subspace()
    data = [(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 1, dtype=torch.float64))]
    with pytest.raises(ValueError, match="positive integer"):
        bc.fit_laplace(sub, data, LIK, hessian="kron", diag_probes=0, progress=False)
    with pytest.raises(ValueError, match="loader is empty"):
        bc.fit_laplace(sub, [], LIK, hessian="kron", progress=False)

    class Laplacian(bc.Likelihood):
        def log_prob(self, out, y):
            return -(out - y).abs().sum(-1)

    with pytest.raises(TypeError, match="hessian='kron'.*output_precision_sqrt"):
        bc.fit_laplace(sub, data, Laplacian(), hessian="kron", progress=False)
