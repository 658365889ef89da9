"""The continuous CoLoRA study end to end on the built-in 1-D Burgers data (a shortened --quick
run: small offline budgets, coarse Galerkin step, few UQ times), asserting on results.json, and
its resume behaviour: a call with --skip-uq, a second call that adds only the uncertainty
phases from the saved state, and a third that redoes only a deleted phase."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "studies"))

QUICK = ["--quick", "--no-progress", "--steps", "150", "--seconds", "60", "--baseline-seconds", "60", "--galerkin-scheme", "euler",
         "--uq-every", "40", "--map-steps", "60", "--factor-snapshots", "16", "--vi-steps", "50",
         "--nuts-samples", "20"]


def test_quick_study_writes_results_after_each_phase_and_resumes(tmp_path):
    import continuous_pde

    out = tmp_path / "run"
    args = QUICK + ["--out", str(out)]
    # call 1: training, evaluation, Galerkin and figures; no uncertainty
    first = continuous_pde.main(args + ["--skip-uq"])
    assert first["phases_last_call"] == ["offline", "baseline", "data_driven", "galerkin", "figures"]
    assert not (out / "bands.png").exists()
    model_bytes = (out / "model.pt").read_bytes()
    # call 2: the same folder; only the uncertainty phases (and the figures drawn from them) run
    res = continuous_pde.main(args)
    assert res["phases_last_call"] == ["uq_sensors", "uq_engines", "uq_factors", "figures"]
    assert (out / "model.pt").read_bytes() == model_bytes          # loaded, not retrained
    saved = json.loads((out / "results.json").read_text())
    assert saved["phases"] == json.loads(json.dumps(res["phases"]))
    ph = saved["phases"]
    assert {k: ph[k] for k in ("offline", "baseline", "data_driven", "galerkin")} == \
        json.loads(json.dumps({k: first["phases"][k] for k in ("offline", "baseline", "data_driven", "galerkin")}))
    for name in ("results.md", "fields_mu0.05.png", "fields_mu0.09.png", "error_over_time.png",
                 "training.png", "bands.png", "baseline.pt", "uq_fields.pt"):
        assert (out / name).stat().st_size > 0, name
    assert saved["test_mus"] == [0.05, 0.09]
    assert saved["n_online"] == 4                       # one alpha per linear layer, 4 layers
    # embedding 3*16, 3 layers 16->16 and one 16->1 with biases, factors r(in+out), alphas
    net = 48 + 3 * (16 * 16 + 16 + 3 * 32 + 1) + (16 + 1 + 3 * 17 + 1)
    assert saved["params"]["network"] == net and saved["params"]["network_without_alphas"] == net - 4
    assert abs(saved["params"]["baseline"] - saved["params"]["total"]) / saved["params"]["total"] < 0.05
    # predicting zero gives 1; even 3 s of training gets well below
    assert 0 < ph["data_driven"]["rel_err"] < 0.2 and 0 < ph["baseline"]["rel_err"] < 1
    assert 0 < ph["galerkin"]["rel_err"] < 0.5
    assert len(ph["galerkin"]["alpha"]) == 2 and len(ph["galerkin"]["alpha"][0][0]) == 4   # (T, d) per mu
    assert ph["offline"]["steps"] >= 1 and ph["offline"]["train_rel_err"] < 0.2
    for rec in ph["uq_sensors"]["per_mu"]:
        assert all(0 <= c <= 1 for c in rec["coverage95"]) and all(s > 0 for s in rec["rel_std"])
    assert set(ph["uq_engines"]["methods"]) == {"laplace", "vi", "nuts"}
    assert all(len(m["posterior_sd"]) == 4 for m in ph["uq_engines"]["methods"].values())
    fac = ph["uq_factors"]
    assert fac["dim"] == 3 * 3 * (16 + 16) + 3 * (16 + 1)      # A, B of every layer
    assert all(0 <= rec["coverage95"] <= 1 and min(rec["rel_epistemic_sd"]) > 0 for rec in fac["per_mu"])

    # call 3: delete one phase's entry; only it (and the figures) is redone, the rest is unchanged
    gal_alpha = saved["phases"].pop("galerkin")["alpha"]
    (out / "results.json").write_text(json.dumps(saved))
    again = continuous_pde.main(args)
    assert again["phases_last_call"] == ["galerkin", "figures"]
    redone = json.loads((out / "results.json").read_text())["phases"]
    assert {k: v for k, v in redone.items() if k not in ("galerkin", "figures")} == \
        {k: v for k, v in saved["phases"].items() if k != "figures"}
    assert redone["galerkin"]["alpha"] == gal_alpha                # deterministic: the same numbers

    # a folder saved with another architecture is refused, not loaded into this one
    clash = json.loads((out / "results.json").read_text())
    clash["config"]["width"] = 17
    (out / "results.json").write_text(json.dumps(clash))
    with pytest.raises(SystemExit, match=r"other settings \{'width': \(17, 16\)\}"):
        continuous_pde.main(args)
    with pytest.raises(SystemExit):
        continuous_pde.main(["--data", str(tmp_path), "--out", str(out)])   # no .hdf5 files there
