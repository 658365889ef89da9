"""The contribution restoration study's --quick mode runs end to end on synthetic data, writes a
consistent table, and resumes: a rerun with the same --out computes only the missing cell, and
computes it as the uninterrupted run did (shortened here: one n, 3 epochs, 4 s of pre-training;
the full --quick run takes about a minute on 2 CPU cores)."""
from __future__ import annotations

import importlib.util
import json
import math
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


# two seeds at one n each, as the GPU grid runs them (one process and folder per seed and n); one
# fine-tuning epoch, 1 s of pre-training and the untempered posteriors keep each run near 5 s
COMBINE_ARGS = ["--quick", "--no-progress", "--pairs", "8", "--epochs", "1", "--pretrain-seconds", "1",
                "--tune", "marglik"]


def _sd(values):
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@pytest.mark.slow
def test_combine_joins_seeds_and_refuses_mixed_folders(tmp_path):
    study = _study()
    runs = {s: tmp_path / f"seed{s}" for s in (0, 1)}
    for s, out in runs.items():
        study.main(COMBINE_ARGS + ["--seed", str(s), "--out", str(out)])
    own = {s: {r["key"]: r for r in json.loads((out / "results.json").read_text())["rows"]} for s, out in runs.items()}
    combined = study.main(["--combine", *map(str, runs.values()), "--out", str(tmp_path / "all")])
    assert json.loads((tmp_path / "all" / "results.json").read_text()) == combined
    assert combined["seeds"] == [0, 1] and "seed" not in combined["config"]

    # per cell: mean and sample sd (divisor K - 1) of the two seeds' values; floats summed in
    # another order, so rel 1e-12
    rows = {r["key"]: r for r in combined["rows"]}
    assert list(rows) == study.ORDER and all(r["pairs"] == 8 and r["seeds"] == [0, 1] for r in rows.values())
    for key, row in rows.items():
        for metric in ("psnr", "ssim", "aurg"):
            if metric not in own[0][key]:  # the noisy input has no uncertainty
                assert metric not in row and key == "noisy"
                continue
            values = [own[s][key][metric] for s in (0, 1)]
            assert row["per_seed"][metric] == values
            assert row[metric] == pytest.approx(sum(values) / 2, rel=1e-12)
            assert row[metric + "_sd"] == pytest.approx(_sd(values), rel=1e-12)
    # different seeds: other test splits, so other noisy inputs
    assert own[0]["noisy"]["psnr"] != own[1]["noisy"]["psnr"]

    # paired differences over seeds: mean and SE = sd / sqrt(2); pooled over the 2 x 8 test
    # images: mean and sd / sqrt(16), and with 8 images per seed the pooled mean is the seeds' mean
    diffs = {(d["a"], d["b"]): d for d in combined["differences"]}
    assert [(a, b, m) for (a, b), d in diffs.items() for m in [d["metric"]]] == study.SEED_PAIRED
    for (a, b), d in diffs.items():
        k = d["metric"]
        per_seed = [own[s][a][k] - own[s][b][k] for s in (0, 1)]
        assert d["seeds"] == [0, 1] and d["per_seed"] == per_seed
        assert d["mean"] == pytest.approx(sum(per_seed) / 2, rel=1e-12)
        assert d["se"] == pytest.approx(_sd(per_seed) / math.sqrt(2), rel=1e-12)
        pooled = [x - y for s in (0, 1) for x, y in zip(own[s][a]["per_image"][k], own[s][b]["per_image"][k])]
        assert d["pooled"]["images"] == 2 * study.QUICK["test_pairs"] == len(pooled)
        assert d["pooled"]["mean"] == pytest.approx(sum(pooled) / len(pooled), rel=1e-9, abs=1e-15)
        assert d["pooled"]["se"] == pytest.approx(_sd(pooled) / math.sqrt(len(pooled)), rel=1e-9)
        assert d["pooled"]["mean"] == pytest.approx(d["mean"], rel=1e-9, abs=1e-15)

    # the targets, decided on the means over seeds, with the margin in SEs over seeds
    targets = {t["target"]: t for t in combined["targets"]}
    better = targets["ContributionLoRA (MAP) > uniform LoRA in PSNR"]
    assert better["margin"] == diffs["map", "uniform"]["mean"] and better["met"] == (better["margin"] > 0)
    assert better["z"] == pytest.approx(better["margin"] / diffs["map", "uniform"]["se"], rel=1e-12)
    near = targets["ContributionLoRA (MAP) within 0.3 dB of full fine-tuning in PSNR (target set at 64 pairs)"]
    assert near["margin"] == pytest.approx(diffs["map", "full"]["mean"] + 0.3, rel=1e-12)
    assert near["met"] == (diffs["map", "full"]["mean"] >= -0.3)
    positive = targets["SWAG AURG > 0"]
    assert positive["se"] == pytest.approx(rows["swag"]["aurg_sd"] / math.sqrt(2), rel=1e-12)
    assert targets["Laplace AURG above MAP's"]["margin"] == diffs["laplace", "map"]["mean"]
    table = (tmp_path / "all" / "results.md").read_text()
    d = diffs["map", "uniform"]
    assert (f"| {d['comparison']} | PSNR | 0, 1 | {d['mean']:+.3f} ± {d['se']:.3f} | "
            f"{d['per_seed'][0]:+.3f}, {d['per_seed'][1]:+.3f} | ") in table

    # refused: other settings than seed and pairs, a cell present twice, a seed's n split
    # between folders, and an --out that holds a study's own results
    other = tmp_path / "other"
    other.mkdir()
    saved = json.loads((runs[1] / "results.json").read_text())
    (other / "results.json").write_text(json.dumps({**saved, "config": {**saved["config"], "epochs": 2}}))
    with pytest.raises(SystemExit, match="differ in epochs: 1 vs 2"):
        study.main(["--combine", str(runs[0]), str(other), "--out", str(tmp_path / "bad")])
    (other / "results.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="seed 1, 8 pairs, cell noisy is in both"):
        study.main(["--combine", str(runs[1]), str(other), "--out", str(tmp_path / "bad")])
    (other / "results.json").write_text(json.dumps({**saved, "rows": saved["rows"][-1:]}))
    split = tmp_path / "split"
    split.mkdir()
    (split / "results.json").write_text(json.dumps({**saved, "rows": saved["rows"][:-1]}))
    with pytest.raises(SystemExit, match="cells of seed 1 at 8 pairs lie in both"):
        study.main(["--combine", str(split), str(other), "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="would overwrite the study results"):
        study.main(["--combine", str(runs[1]), "--out", str(runs[0])])
