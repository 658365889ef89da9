"""The shared training loop (``optimise``): losses read back from the device in groups, non-finite
losses still reported by epoch and first batch, history means unchanged; and the functional call
over theta with an adapter reachable under two module paths."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bayes_colora as bc
from bayes_colora.inference import objective
from bayes_colora.inference.objective import negative_log_joint, optimise


def _sub() -> bc.Subspace:
    torch.manual_seed(0)
    return bc.Subspace.from_model(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), bc.BitFit())


def _batch(seed: int, huge: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.full((4, 1), 1e30) if huge else torch.randn(4, 1, generator=g)
    return torch.randn(4, 3, generator=g), y  # 1e30 is finite, its square overflows float32


class _Epochs:
    """A loader whose batches ``bad`` (pairs ``(epoch, batch)``) have an overflowing loss."""

    def __init__(self, n_batches: int, bad: set[tuple[int, int]]):
        self.n_batches, self.bad, self.epoch = n_batches, bad, -1

    def __iter__(self):
        self.epoch += 1
        return iter([_batch(i, (self.epoch, i) in self.bad) for i in range(self.n_batches)])


@pytest.mark.parametrize("every", [1, 4, 32])
def test_non_finite_loss_names_epoch_and_first_batch_and_stops_before_the_epoch_hook(
        tmp_path, monkeypatch, every):
    # read back after every batch, in the middle of the epoch (batches 0-3), or at its end only
    monkeypatch.setattr(objective, "CHECK_EVERY", every)
    loader = _Epochs(6, bad={(2, 3), (2, 5)})
    path = tmp_path / "state.pt"
    with pytest.raises(ValueError, match=r"^epoch 2, batch 3: the loss is not finite \((inf|nan)\)"):
        bc.fit_map(_sub(), loader, bc.Gaussian(sigma=1.0), epochs=4, progress=False, n_data=24,
                   checkpoint=path)
    state = torch.load(path, weights_only=False)  # written by the last completed epoch only
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    assert torch.isfinite(state["theta"]).all()
    assert all(math.isfinite(h["loss"]) for h in state["history"])


def test_first_batch_is_checked_before_its_step():
    sub = _sub()
    theta = torch.nn.Parameter(sub.theta.clone())
    start = theta.detach().clone()
    opt = torch.optim.SGD([theta], lr=0.1)
    steps = []
    with pytest.raises(ValueError, match=r"epoch 0, batch 0: the loss is not finite"):
        optimise(sub, theta, [_batch(0, huge=True), _batch(1)], bc.Gaussian(sigma=1.0), None, 8,
                 1, opt, "test", progress=False, on_step=lambda e, s: steps.append(s))
    assert steps == [] and torch.equal(theta.detach(), start)


def test_earlier_non_finite_loss_is_reported_before_later_bad_data():
    bad_x = _batch(3)
    bad_x[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"epoch 0, batch 1: the loss is not finite"):
        bc.fit_map(_sub(), [_batch(0), _batch(1, huge=True), _batch(2), bad_x],
                   bc.Gaussian(sigma=1.0), epochs=1, progress=False)


@pytest.mark.parametrize("every", [1, 2, 32])
def test_history_is_the_mean_of_the_batch_losses(monkeypatch, every):
    # 5 batches: with every=2 the read-backs split them 2 + 2 + 1 (the last at the epoch's end)
    monkeypatch.setattr(objective, "CHECK_EVERY", every)
    loader = [_batch(i) for i in range(5)]
    lik, prior = bc.Gaussian(sigma=0.7), bc.NormalPrior(0.5)
    sub = _sub()
    theta0 = sub.theta.clone() + 0.1  # off zero, so that the prior term is not 0
    sub.theta = theta0
    # lr = 0: theta stays at theta0, so each record is the mean over batches of L(theta0) and NLL
    post = bc.fit_map(sub, loader, lik, prior=prior, epochs=2, lr=0.0, progress=False, n_data=20)
    with torch.no_grad():
        per_batch = torch.stack([torch.stack(negative_log_joint(sub, theta0, lik, prior, x, y, 20))
                                 for x, y in loader])  # (5, 2): loss, nll
    want_loss, want_nll = per_batch.double().mean(0).tolist()
    assert len(post.history) == 2
    for record in post.history:  # float32 values summed in float64: relative error ~ float32 eps
        assert record["loss"] == pytest.approx(want_loss, rel=1e-6)
        assert record["nll"] == pytest.approx(want_nll, rel=1e-6)
    assert abs(want_loss - want_nll) > 1e-3  # the two records differ by the prior term


def _check_theta_reaches_every_use(sub: bc.Subspace, x: torch.Tensor) -> None:
    """``sub(x, theta=t)`` (and its gradient) equals the module run with its own parameters set to
    ``t``, which every use of a shared parameter sees; the module keeps its parameters."""
    params = sub._params()
    thetas = torch.randn(3, sub.dim)
    batched = sub(x, theta=thetas)
    for t, out in zip(thetas, batched):
        single = sub(x, theta=t)
        sub.theta = t
        torch.testing.assert_close(single, sub(x), rtol=0, atol=0)
        torch.testing.assert_close(out, sub(x))  # vmap: same values up to float rounding
    t = thetas[0].clone().requires_grad_(True)
    sub(x, theta=t).sum().backward()
    sub.theta = thetas[0]
    sub(x).sum().backward()
    torch.testing.assert_close(t.grad, torch.cat([p.grad.reshape(-1) for p in params]))
    # the functional calls put the module's own parameters back
    assert all(type(p) is nn.Parameter and p is q for p, q in zip(sub._params(), params))


def test_theta_reaches_an_adapter_of_a_module_registered_under_two_paths():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(3, 3))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = block, block  # one module, two paths

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    sub = bc.Subspace.from_model(Twice(), bc.LoRA(rank=2))
    assert sub.param_names == ["a.0.lora_A", "a.0.lora_B"]
    _check_theta_reaches_every_use(sub, torch.randn(5, 3))


def test_theta_reaches_a_parameter_shared_by_two_adapters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    bc.Subspace.from_model(model, bc.BitFit())
    model[2].bias_delta = model[0].bias_delta  # two adapter modules, one parameter
    sub = bc.Subspace(model, [bc.BitFit()])
    assert sub.param_names == ["0.bias_delta"]
    _check_theta_reaches_every_use(sub, torch.randn(5, 3))


# ------------------------------------------- data that the loader yields on the device
def _on_device(monkeypatch) -> None:
    """Treat every tensor as one the loader yields on an accelerator: its finiteness check is
    left on the device and read back with the losses (what a CUDA run does, here on the CPU)."""
    monkeypatch.setattr(objective, "_on_host", lambda t: False)


def _with_nan(seed: int, where: str, values: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _batch(seed)
    t = x if where == "input" else y
    t.view(-1)[:len(values)] = torch.tensor(values)
    return x, y


@pytest.mark.parametrize("every", [1, 2, 32])
def test_device_data_check_names_batch_and_count_as_the_host_check(monkeypatch, every):
    monkeypatch.setattr(objective, "CHECK_EVERY", every)
    loaders = {r"batch 2: input has 3 non-finite value\(s\) \(NaN or inf\)":
               [_batch(0), _batch(1), _with_nan(2, "input", (math.nan, math.inf, -math.inf)), _batch(3)],
               r"batch 1: target has 1 non-finite value\(s\) \(NaN or inf\)":
               [_batch(0), _with_nan(1, "target", (math.nan,)), _batch(2)]}
    for message, loader in loaders.items():
        with pytest.raises(ValueError, match="^" + message):  # on the host: before batch 2 runs
            bc.fit_map(_sub(), loader, bc.Gaussian(sigma=1.0), epochs=1, progress=False)
    _on_device(monkeypatch)
    for message, loader in loaders.items():
        with pytest.raises(ValueError, match="^" + message):  # on the device: at the read-back
            bc.fit_map(_sub(), loader, bc.Gaussian(sigma=1.0), epochs=1, progress=False)
    # an input that is a dict of tensors is named by its key, as on the host
    sub = bc.Subspace.from_model(_Keyword(), bc.BitFit())
    x, y = _with_nan(0, "input", (math.nan,))
    with pytest.raises(ValueError, match=r"^batch 0: input\['input'\] has 1 non-finite"):
        bc.fit_map(sub, [{"input": x, "labels": y}], bc.Gaussian(sigma=1.0), epochs=1, progress=False)


class _Keyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, input):  # noqa: A002
        return self.lin(input)


def test_device_data_check_keeps_batch_order_with_the_losses(monkeypatch):
    _on_device(monkeypatch)
    lik = bc.Gaussian(sigma=1.0)
    # an earlier non-finite loss is the error, not later bad data
    with pytest.raises(ValueError, match=r"epoch 0, batch 1: the loss is not finite"):
        bc.fit_map(_sub(), [_batch(0), _batch(1, huge=True), _with_nan(2, "input", (math.nan,))],
                   lik, epochs=1, progress=False)
    # a batch's bad data is the error, not the non-finite loss it causes (batch 1's loss is NaN)
    with pytest.raises(ValueError, match=r"^batch 1: input has 1 non-finite"):
        bc.fit_map(_sub(), [_batch(0), _with_nan(1, "input", (math.nan,)), _batch(2, huge=True)],
                   lik, epochs=1, progress=False)
    # the first batch is checked before its step, its data too
    sub = _sub()
    theta = torch.nn.Parameter(sub.theta.clone())
    start, steps = theta.detach().clone(), []
    with pytest.raises(ValueError, match=r"^batch 0: input has 1 non-finite"):
        optimise(sub, theta, [_with_nan(0, "input", (math.inf,)), _batch(1)], lik, None, 8, 1,
                 torch.optim.SGD([theta], lr=0.1), "test", progress=False,
                 on_step=lambda e, s: steps.append(s))
    assert steps == [] and torch.equal(theta.detach(), start)


def test_device_data_check_leaves_the_fit_unchanged(monkeypatch):
    monkeypatch.setattr(objective, "CHECK_EVERY", 2)
    loader, lik, prior = [_batch(i) for i in range(5)], bc.Gaussian(sigma=0.7), bc.NormalPrior(0.5)
    host = bc.fit_map(_sub(), loader, lik, prior=prior, epochs=2, lr=1e-2, progress=False)
    _on_device(monkeypatch)
    device = bc.fit_map(_sub(), loader, lik, prior=prior, epochs=2, lr=1e-2, progress=False)
    assert torch.equal(host.mean, device.mean) and host.history == device.history


def test_functional_call_is_torch_func_functional_call_and_restores_on_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 3), nn.Flatten(),
                          nn.Linear(12, 2))
    sub = bc.Subspace.from_model(model, [bc.ConvCoLoRA(), bc.BitFit(targets="4")])
    x, t = torch.randn(5, 2, 4, 4), torch.randn(sub.dim, requires_grad=True)
    want = torch.func.functional_call(sub.model, sub.unflatten(t), (x,))
    got = sub(x, theta=t)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (g_want,) = torch.autograd.grad(want.square().sum(), t)
    (g_got,) = torch.autograd.grad(got.square().sum(), t)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)
    params = sub._params()
    with pytest.raises(RuntimeError):
        sub(torch.randn(5, 7, 4, 4), theta=t)  # wrong channel count: the model raises mid-call
    assert all(type(p) is nn.Parameter and p is q for p, q in zip(sub._params(), params))
