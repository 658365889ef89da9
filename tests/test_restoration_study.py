"""The contribution restoration study's --quick mode runs end to end on synthetic data, writes a
consistent table, and resumes: a rerun with the same --out computes only the missing cell, and
computes it as the uninterrupted run did (shortened here: one n, 3 epochs, 4 s of pre-training;
the full --quick run takes about a minute on 2 CPU cores)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "studies" / "contribution_restoration.py"
ARGS = ["--quick", "--no-progress", "--pairs", "8", "--epochs", "3", "--pretrain-seconds", "4"]


def _study():
    spec = importlib.util.spec_from_file_location("contribution_restoration", STUDY)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    return study


@pytest.mark.slow
def test_quick_study_runs_and_resumes(tmp_path):
    study = _study()
    result = study.main(ARGS + ["--out", str(tmp_path)])
    for name in ("results.json", "results.md", "pretrained.pt", "map_n8.pt", "example_n8_laplace.pt",
                 "psnr_vs_pairs.png", "rank_allocation.png", "uncertainty_example.png", "sparsification.png"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = {r["key"]: r for r in saved["rows"]}
    assert list(rows) == study.ORDER and all(r["run"] == 1 for r in rows.values())
    # same budget: ContributionLoRA never exceeds the uniform LoRA's parameter count
    assert 0 < rows["map"]["params"] <= rows["uniform"]["params"]
    assert sum(a["params"] for a in saved["allocation"]["8"]) == rows["map"]["params"]
    assert set(saved["scores"]["8"]) == {a["layer"] for a in saved["allocation"]["8"]}
    assert rows["full"]["params"] == saved["network_params"]
    for row in saved["rows"][1:]:
        assert 10 < row["psnr"] < 60 and 0 < row["ssim"] <= 1
    # per test image, in test order; the row's metrics are their means (up to float rounding)
    for row in saved["rows"]:
        for key, values in row["per_image"].items():
            assert len(values) == study.QUICK["test_pairs"], (row["key"], key)
            assert sum(values) / len(values) == pytest.approx(row[key], rel=1e-12, abs=1e-15), (row["key"], key)
    assert set(rows["swag"]["per_image"]) == {"psnr", "ssim", "nll", "ause", "aurg", "aurg_aleatoric",
                                              "aurg_epistemic"}
    # the tuned widths come from the grids; the linearised Laplace keeps the MAP's mean exactly
    assert rows["laplace"]["temperature"] in study.QUICK["temperature_grid"]
    assert rows["laplace"]["prior_precision"] in study.QUICK["prior_grid"]
    assert rows["swag"]["swag_scale"] in study.QUICK["swag_scales"]
    # antithetic linearised samples: the mean is f(x; theta*) up to rounding, so MAP's PSNR
    assert rows["laplace"]["psnr"] == pytest.approx(rows["map"]["psnr"], abs=1e-3)
    assert result["rows"] == saved["rows"]

    # an interrupted run: the Laplace cell is missing. The rerun computes that cell alone, from the
    # saved pre-trained network, FAIG scores and MAP, and gets what the first run got. The full
    # fine-tuning row is made old-style (no per_image): it is kept as it is, not recomputed, and
    # its paired comparison shows "-".
    lost = rows.pop("laplace")
    del rows["full"]["per_image"]
    saved["rows"] = [r for r in saved["rows"] if r["key"] != "laplace"]
    (tmp_path / "results.json").write_text(json.dumps(saved))
    again = study.main(ARGS + ["--out", str(tmp_path)])
    assert again["runs"][-1]["cells"] == ["8/laplace"]
    assert again["pretrain"] == saved["pretrain"]
    redone = {r["key"]: r for r in again["rows"]}
    assert {k: r for k, r in redone.items() if k != "laplace"} == rows  # untouched, run 1
    assert redone["laplace"]["run"] == 2
    table = (tmp_path / "results.md").read_text()
    assert "| ContributionLoRA (MAP) - full fine-tuning | - | - |" in table
    # the linearised Laplace keeps MAP's mean, so its per-image PSNRs are MAP's (abs 1e-3 as above)
    laplace_line = next(line for line in table.splitlines()
                        if line.startswith("| ContributionLoRA + Laplace - ContributionLoRA (MAP) |"))
    mean, se = (float(v) for v in laplace_line.split(" | ")[1].split(" ± "))
    assert abs(mean) < 1e-3 and 0 <= se < 1e-3
    for key in ("psnr", "nll", "aurg", "aurg_epistemic", "temperature", "prior_precision"):
        # same seeds, same inputs, same CPU: the same numbers up to float32 summation order
        assert redone["laplace"][key] == pytest.approx(lost[key], rel=1e-5, abs=1e-7), key

    # other settings in the same folder are refused, not mixed in
    with pytest.raises(SystemExit, match="other settings.*epochs: 3 -> 2"):
        study.main(ARGS[:-4] + ["--epochs", "2", "--pretrain-seconds", "4", "--out", str(tmp_path)])
