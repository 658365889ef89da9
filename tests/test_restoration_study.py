"""The contribution restoration study's --quick mode runs end to end on synthetic data and writes
a consistent table (shortened here: one n, 3 epochs, 4 s of pre-training; the full --quick run
takes about 45 s on 2 CPU cores)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "studies" / "contribution_restoration.py"


@pytest.mark.slow
def test_quick_study_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("contribution_restoration", STUDY)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    result = study.main(["--quick", "--out", str(tmp_path), "--no-progress", "--pairs", "8",
                         "--epochs", "3", "--pretrain-seconds", "4"])
    for name in ("results.json", "results.md", "psnr_vs_pairs.png", "rank_allocation.png",
                 "uncertainty_example.png", "sparsification.png"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in saved["rows"]}
    uniform = next(r for m, r in rows.items() if m.startswith("LoRA, uniform"))
    contrib = rows["ContributionLoRA (MAP)"]
    # same budget: ContributionLoRA never exceeds the uniform LoRA's parameter count
    assert 0 < contrib["params"] <= uniform["params"]
    assert sum(a["params"] for a in saved["allocation"]["8"]) == contrib["params"]
    assert rows["full fine-tuning"]["params"] == saved["network_params"]
    for row in saved["rows"][1:]:
        assert 10 < row["psnr"] < 60 and 0 < row["ssim"] <= 1
    assert result["rows"] == saved["rows"]
