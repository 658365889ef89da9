"""The continuous CoLoRA study end to end on the built-in 1-D Burgers data (a shortened --quick
run: small offline budgets, coarse Galerkin step, few UQ times), asserting on results.json."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "studies"))


def test_quick_study_writes_results(tmp_path):
    import continuous_pde

    out = tmp_path / "run"
    continuous_pde.main(["--quick", "--out", str(out), "--no-progress", "--seconds", "3",
                         "--baseline-seconds", "1", "--galerkin-scheme", "euler", "--uq-every", "40",
                         "--map-steps", "60", "--factor-snapshots", "16",
                         "--vi-steps", "50", "--nuts-samples", "20"])
    res = json.loads((out / "results.json").read_text())
    for name in ("results.md", "fields_mu0.05.png", "fields_mu0.09.png", "error_over_time.png",
                 "training.png", "bands.png"):
        assert (out / name).stat().st_size > 0, name
    assert res["test_mus"] == [0.05, 0.09]
    assert res["n_online"] == 4                       # one alpha per linear layer, 4 layers
    # embedding 3*16, 3 layers 16->16 and one 16->1 with biases, factors r(in+out), alphas
    net = 48 + 3 * (16 * 16 + 16 + 3 * 32 + 1) + (16 + 1 + 3 * 17 + 1)
    assert res["params"]["network"] == net
    assert abs(res["params"]["baseline"] - res["params"]["total"]) / res["params"]["total"] < 0.05
    # predicting zero gives 1; even 3 s of training gets well below
    assert 0 < res["rel_err"] < 0.2 and 0 < res["baseline_rel_err"] < 1
    assert 0 < res["galerkin_rel_err"] < 0.5
    for rec in res["uq"]["per_mu"]:
        assert all(0 <= c <= 1 for c in rec["coverage95"]) and all(s > 0 for s in rec["rel_std"])
    assert set(res["uq"]["methods"]) == {"laplace", "vi", "nuts"}
    assert all(len(m["posterior_sd"]) == 4 for m in res["uq"]["methods"].values())
    fac = res["uq"]["factors"]
    assert fac["dim"] == 3 * 3 * (16 + 16) + 3 * (16 + 1)      # A, B of every layer
    assert all(0 <= rec["coverage95"] <= 1 and min(rec["rel_epistemic_sd"]) > 0 for rec in fac["per_mu"])
    with pytest.raises(SystemExit):
        continuous_pde.main(["--data", str(tmp_path), "--out", str(out)])   # no .hdf5 files there
