"""CollaborativeLoRA and the task ids that travel through Subspace: against the explicit formula
``y = W x + b + (alpha / r) B (I + D_t) A x`` per example."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import bayes_colora as bc
from bayes_colora.adapters.collaborative import personal_subspace, theta_blocks
from bayes_colora.subspace import current_task

from conftest import bert


def _mlp_sub(personal: str = "full", n_tasks: int = 3, rank: int = 2, alpha: float | None = None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    ref = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    ref.load_state_dict(model.state_dict())
    sub = bc.Subspace.from_model(model, bc.CollaborativeLoRA(rank, n_tasks, personal=personal, alpha=alpha))
    return sub, ref


def _explicit(sub: bc.Subspace, ref: nn.Sequential, theta: torch.Tensor, x: torch.Tensor,
              task: torch.Tensor) -> torch.Tensor:
    """The adapted MLP evaluated one example at a time from the formula."""
    p = sub.unflatten(theta)
    spec = sub.specs[0]
    rows = []
    for xi, t in zip(x, task.tolist()):
        h = xi
        for idx in (0, 2):
            layer = ref[idx]
            d = p[f"{idx}.personal_{t}"]
            r = torch.eye(spec.rank) + d if spec.personal == "full" else torch.diag(1 + d)
            w = layer.weight + spec.alpha / spec.rank * p[f"{idx}.lora_B"] @ r @ p[f"{idx}.lora_A"]
            h = w @ h + layer.bias
            if idx == 0:
                h = torch.tanh(h)
        rows.append(h)
    return torch.stack(rows)


@pytest.mark.parametrize("personal", ["full", "diagonal"])
def test_matches_formula_and_zero_at_init(personal):
    sub, ref = _mlp_sub(personal, alpha=3.0)
    x, task = torch.randn(6, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    torch.testing.assert_close(sub(x, task=task), ref(x), rtol=0, atol=0)  # zero delta: bit for bit
    theta = torch.randn(sub.dim)
    torch.testing.assert_close(sub(x, theta=theta, task=task), _explicit(sub, ref, theta, x, task),
                               rtol=1e-5, atol=1e-5)
    per_layer = 2 * 5 + 7 * 2 + 3 * (4 if personal == "full" else 2) + 2 * 7 + 3 * 2 + 3 * (4 if personal == "full" else 2)
    assert sub.dim == per_layer


def test_dict_field_vmap_and_mixed_batches():
    sub, _ = _mlp_sub()
    x, task = torch.randn(6, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    thetas = torch.randn(4, sub.dim)
    batched = sub({"input": x, "task": task}, theta=thetas)
    loop = torch.stack([sub(x, theta=t, task=task) for t in thetas])
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-5)
    # a mixed batch equals each task's examples run alone
    for t in range(3):
        rows = task == t
        torch.testing.assert_close(batched[:, rows], sub(x[rows], theta=thetas, task=task[rows]),
                                   rtol=1e-5, atol=1e-5)
    assert current_task() is None  # the context is cleared after the call


def test_task_errors():
    sub, _ = _mlp_sub()
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="needs the task id"):
        sub(x)
    with pytest.raises(ValueError, match=r"task ids have shape \(3,\).*\(4, 5\)"):
        sub(x, task=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="0 ... 2"):
        sub(x, task=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="1-D integer"):
        sub(x, task=torch.zeros(4))
    with pytest.raises(ValueError, match="given twice"):
        sub({"input": x, "task": torch.zeros(4, dtype=torch.long)}, task=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="personal must be"):
        bc.CollaborativeLoRA(2, 3, personal="lowrank")
    with pytest.raises(RuntimeError, match="cannot be merged"):
        sub.merge()


def test_single_task_merges_and_needs_no_ids():
    sub, _ = _mlp_sub(n_tasks=1)
    sub.theta = torch.randn(sub.dim)
    x = torch.randn(4, 5)
    before = sub(x)
    sub.merge()
    torch.testing.assert_close(sub(x), before, rtol=1e-5, atol=1e-5)
    sub.unmerge()


def test_blocks_and_personal_subspace_fit_only_the_new_task():
    sub, _ = _mlp_sub()
    blocks = theta_blocks(sub)
    assert sorted(blocks) == ["shared", "task0", "task1", "task2"]
    assert torch.equal(torch.sort(torch.cat(list(blocks.values()))).values, torch.arange(sub.dim))
    assert blocks["task1"].numel() == 2 * 4 and blocks["shared"].numel() == (2 * 5 + 7 * 2) + (2 * 7 + 3 * 2)
    assert sub.count_by_adapter() == {"CollaborativeLoRALinear": sub.dim}
    sub.theta = torch.randn(sub.dim) * 0.5
    full_before = sub.theta.clone()
    new = personal_subspace(sub, 2)
    assert new.dim == 8 and all(p.requires_grad for p in sub._params())  # the original is unchanged
    torch.manual_seed(1)
    x = torch.randn(32, 5)
    task = torch.full((32,), 2)
    y = sub(x, theta=full_before + torch.randn(sub.dim) * 0.3 * (torch.isin(torch.arange(sub.dim), blocks["task2"])), task=task)
    loader = [{"input": x[i:i + 16], "task": task[i:i + 16], "labels": y[i:i + 16].detach()} for i in (0, 16)]
    post = bc.fit_map(new, loader, bc.Gaussian(sigma=0.1), epochs=200, lr=2e-2, progress=False)
    after = sub.theta
    moved = torch.isin(torch.arange(sub.dim), blocks["task2"])
    torch.testing.assert_close(after[~moved], full_before[~moved], rtol=0, atol=0)  # shared frozen
    assert (after[moved] - full_before[moved]).abs().max() > 1e-2
    assert post.history[-1]["nll"] < post.history[0]["nll"]
    lap = bc.fit_laplace(new, loader, bc.Gaussian(sigma=0.1), hessian="full", progress=False)
    assert lap.covariance.shape == (8, 8)


def test_tiny_bert_vmap_with_task_field():
    model, x = bert()
    sub = bc.Subspace.from_model(model, bc.CollaborativeLoRA(2, 2, targets=r"attention\.self\.(query|value)$"))
    x = dict(x, task=torch.tensor([1, 0]))
    thetas = torch.randn(3, sub.dim) * 0.1
    batched = sub(x, theta=thetas)
    loop = torch.stack([sub(x, theta=t) for t in thetas])
    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=1e-5)
    # task 1's personal block does not change task 0's example
    t1 = theta_blocks(sub)["task1"]
    bumped = thetas[0].clone()
    bumped[t1] += 1.0
    out0, out1 = sub(x, theta=thetas[0]), sub(x, theta=bumped)
    torch.testing.assert_close(out0[1], out1[1], rtol=0, atol=0)
    assert (out0[0] - out1[0]).abs().max() > 1e-4
