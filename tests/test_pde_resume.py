"""Resumable offline training: a run split into many stopped-and-resumed calls (each through
``torch.save`` / ``torch.load`` and a freshly built model) does exactly what the uninterrupted
run does, since on the CPU the same operations in the same order give the same bits; a time
budget is summed over the calls; and the --quick study split by --call-seconds continues from
the saved step."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

from bayes_colora import pde

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "studies"))


def _data() -> pde.Snapshots:
    # 11 snapshots in batches of 3: 3 batches per epoch, 2 snapshots left out of each epoch
    return pde.Snapshots.from_trajectories(pde.burgers_trajectories([0.1], n_x=16, n_t=11, t_end=0.5))


def _model(seed: int) -> pde.ReducedModel:
    torch.manual_seed(seed)
    return pde.ReducedModel.build(1, 1, width=6, depth=2, rank=2, hyper_width=4)


KW = {"steps": 300, "lr": 1e-2, "final_lr": 1e-3, "batch": 3, "n_points": 9, "progress": False, "log_every": 7}


def test_split_training_is_the_uninterrupted_training(tmp_path):
    data = _data()
    ref = _model(0)
    ref_hist = pde.train_offline(ref, data, **KW)
    # the schedule: the record at step k holds the rate of step k - 1, progress (k - 1) / steps
    for rec in ref_hist:
        p = (rec["step"] - 1) / KW["steps"]
        want = KW["final_lr"] + (KW["lr"] - KW["final_lr"]) * 0.5 * (1 + math.cos(math.pi * p))
        assert rec["lr"] == pytest.approx(want, rel=1e-12)

    path, state, n_calls = tmp_path / "state.pt", {}, 0
    while not state.get("finished"):
        state = torch.load(path) if n_calls else {}
        model = _model(100 + n_calls)                  # other weights: the state must replace them
        hist = pde.train_offline(model, data, state=state, stop_after_seconds=0.02, **KW)
        torch.save(state, path)
        n_calls += 1
    assert n_calls >= 2                                # 300 steps take longer than 0.02 s
    calls = state["calls"]
    assert calls[0]["from_step"] == 0 and calls[-1]["to_step"] == KW["steps"] and state["step"] == KW["steps"]
    assert all(a["to_step"] == b["from_step"] for a, b in zip(calls, calls[1:]))   # each call went on
    assert all(a["to_step"] > a["from_step"] for a in calls)        # 0.02 s > 0: a step per call
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), name
    assert [(r["step"], r["loss"], r["lr"]) for r in hist] == [(r["step"], r["loss"], r["lr"]) for r in ref_hist]
    assert all(not p.requires_grad for n, p in model.sub.model.named_parameters() if not n.endswith("alpha"))
    # a finished state trains no further; other settings are refused
    again = dict(state)
    assert pde.train_offline(model, data, state=again, **KW) == hist and again["step"] == KW["steps"]
    with pytest.raises(ValueError, match=r"other training settings \{'lr': \(0.01, 0.02\)\}"):
        pde.train_offline(model, data, state=dict(state), **(KW | {"lr": 2e-2}))


def test_a_time_budget_is_summed_over_the_calls():
    data, budget, per_call = _data(), 0.5, 0.125   # exact in binary
    model, state, n_calls = _model(0), {}, 0
    while not state.get("finished"):
        pde.train_offline(model, data, state=state, stop_after_seconds=per_call, max_seconds=budget,
                          **(KW | {"steps": 10 ** 9}))
        n_calls += 1
    calls = state["calls"]
    # every call but the last stops at its own per_call seconds, before the budget is spent:
    # (n - 1) per_call <= seconds before the last call < budget, so 2 <= n <= ceil(budget / per_call)
    assert all(c["seconds"] >= per_call for c in calls[:-1])
    assert 2 <= n_calls == len(calls) <= math.ceil(budget / per_call)
    assert sum(c["seconds"] for c in calls[:-1]) < budget <= state["seconds"]
    assert state["seconds"] == pytest.approx(sum(c["seconds"] for c in calls), rel=1e-12)
    assert state["history"][-1]["step"] == state["step"] == calls[-1]["to_step"]


def test_quick_study_split_by_call_seconds_resumes(tmp_path, capsys):
    import continuous_pde

    out = tmp_path / "run"
    # the step budget is out of reach, so the time budget (2 s) ends the training: call 1 stops
    # after 1 s of it, unfinished; call 2 spends the rest and runs the later phases
    args = ["--quick", "--no-progress", "--steps", "1000000", "--seconds", "2", "--call-seconds", "1",
            "--baseline-seconds", "1", "--no-galerkin", "--skip-uq", "--out", str(out)]
    first = continuous_pde.main(args)
    assert first["phases_last_call"] == [] and first["phases"] == {}
    assert json.loads((out / "results.json").read_text())["phases"] == {}
    assert not (out / "model.pt").exists()
    saved = torch.load(out / "offline_state.pt")
    assert not saved["finished"] and saved["step"] > 0 and 1 <= saved["seconds"] < 2
    assert f"offline: stopped at step {saved['step']:,}" in capsys.readouterr().out

    res = continuous_pde.main(args)
    assert f"offline: resumed at step {saved['step']:,}" in capsys.readouterr().out
    assert res["phases_last_call"] == ["offline", "baseline", "data_driven", "figures"]
    off = res["phases"]["offline"]
    assert [c["from_step"] for c in off["calls"]] == [0, saved["step"]]          # not from 0 again
    assert off["calls"][0]["to_step"] == saved["step"] < off["steps"] == off["calls"][1]["to_step"]
    assert off["seconds"] >= 2 and off["calls"][0]["seconds"] == saved["seconds"]
    assert off["history"][:len(saved["history"])] == saved["history"]
    assert (out / "model.pt").exists() and not (out / "offline_state.pt").exists()
    assert 0 < res["phases"]["data_driven"]["rel_err"] < 1
