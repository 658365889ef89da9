"""Per-image metrics and paired differences of the contribution restoration study: the per-image
values average to the batch aggregate of ``R.evaluate_restoration``, the paired mean and standard
error match a hand computation, and rows without per-image values (an older results.json)
render "-" in the paired table."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from bayes_colora import restoration as R
from bayes_colora.predictive import Predictive

STUDY = Path(__file__).resolve().parents[1] / "studies" / "contribution_restoration.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("contribution_restoration", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_per_image_means_equal_the_batch_aggregate(study):
    """``evaluate`` scores each image alone; every aggregate of ``R.evaluate_restoration`` is a
    mean over equally sized images (the NLL a mean per element), so the per-image means equal
    the batch values. Both are computed in float32 from the same per-image sums, in different
    orders, so they agree to a few float32 ulps: rel 1e-5 (about 100 eps) is ample, and far
    below the spread between images checked last."""
    m = 5
    test = study.synthetic_pairs(m, 32, seed=3)
    g = torch.Generator().manual_seed(4)
    offsets = 0.05 * torch.randn(m, 3, 32, 32, generator=g)
    aleatoric = 0.001 + 0.01 * torch.rand(m, 3, 32, 32, generator=g)
    epistemic = 0.002 * torch.rand(m, 3, 32, 32, generator=g)

    def predict_fn(x):  # a fixed, image-dependent predictive for each noisy input
        i = next(i for i, (_, a, _) in enumerate(test) if torch.equal(a, x[0]))
        mean = (test[i][2] + offsets[i])[None]
        return Predictive(mean, aleatoric[i:i + 1], epistemic[i:i + 1], (aleatoric + epistemic)[i:i + 1])

    metrics, per_image, pred = study.evaluate(predict_fn, test, "cpu")
    batch = R.evaluate_restoration(pred, torch.stack([b for _, _, b in test]))
    assert set(per_image) == set(batch) == set(metrics)
    # test order: entry i is image i evaluated alone (checked for i = 2)
    third = R.evaluate_restoration(Predictive(*(getattr(pred, f)[2:3] for f in
                                                ("mean", "aleatoric", "epistemic", "total"))), test[2][2][None])
    for k, values in per_image.items():
        assert len(values) == m, k
        assert sum(values) / m == pytest.approx(batch[k], rel=1e-5, abs=1e-9), k
        assert metrics[k] == pytest.approx(batch[k], rel=1e-5, abs=1e-9), k
        assert values[2] == third[k], k
    assert max(per_image["psnr"]) - min(per_image["psnr"]) > 0.1  # the images do differ


def test_paired_difference_by_hand(study):
    # d = a - b = [1, 2, 3]: mean 2, sample sd 1, SE 1 / sqrt(3)
    mean, se = study._mean_and_se([1.5, 4.0, 3.25], [0.5, 2.0, 0.25])
    assert mean == pytest.approx(2.0, abs=1e-12)
    assert se == pytest.approx(1 / math.sqrt(3), abs=1e-12)
    # a constant shift has zero spread
    assert study._mean_and_se([2.0, 3.0], [1.0, 2.0]) == (1.0, 0.0)
    with pytest.raises(ValueError):
        study._mean_and_se([1.0], [0.0])
    with pytest.raises(ValueError):
        study._mean_and_se([1.0, 2.0], [0.0])


def _row(n, key, psnr=None, aurg=None):
    row = {"pairs": n, "key": key, "method": key.upper(), "params": 0, "psnr": 30.0}
    if psnr is not None:
        row["per_image"] = {"psnr": psnr, "aurg": aurg}
    return row


def test_paired_table_hand_values_and_old_rows(study):
    """New rows give the hand-computed mean ± SE; a row without per_image (older results.json)
    gives "-" in every comparison it is part of; a comparison with a missing row is left out."""
    rows = [_row(4, "full"),  # old style: no per-image values
            _row(4, "uniform", psnr=[30.0, 31.0, 32.0], aurg=[0.001, 0.001, 0.001]),
            _row(4, "map", psnr=[31.0, 33.0, 35.0], aurg=[0.002, 0.003, 0.004]),
            _row(4, "swag", psnr=[31.0, 33.0, 35.0], aurg=[0.003, 0.005, 0.007])]
    lines = study.paired_lines(rows)
    table = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ")[1:] for line in lines
             if line.startswith("| ") and " - " in line}
    # MAP - uniform: PSNR d = [1, 2, 3] -> +2 ± 1/sqrt(3); AURG d = [1, 2, 3] e-3 -> 2e-3 ± 5.8e-4
    assert table["MAP - UNIFORM"] == [f"+2.000 ± {1 / math.sqrt(3):.3f}", f"+2.00e-03 ± {1e-3 / math.sqrt(3):.1e}"]
    # SWAG - MAP: PSNR equal -> 0 ± 0; AURG d = [1, 2, 3] e-3
    assert table["SWAG - MAP"] == ["+0.000 ± 0.000", f"+2.00e-03 ± {1e-3 / math.sqrt(3):.1e}"]
    assert table["MAP - FULL"] == ["-", "-"]
    assert "LAPLACE - MAP" not in table  # no Laplace row yet
    assert any("over the 3 test images" in line for line in lines)


def test_write_table_includes_paired_section(study, tmp_path):
    """results.md carries the paired table."""
    rows = [_row(4, "uniform", psnr=[30.0, 31.0], aurg=[0.0, 0.0]), _row(4, "map", psnr=[31.0, 31.5], aurg=[0.0, 0.0])]
    text = study.write_table({"rows": rows, "config": {"tune": "validation"}, "allocation": {}}, tmp_path).read_text()
    # d = [1, 0.5]: mean 0.75, sd sqrt(0.125), SE sqrt(0.125) / sqrt(2) = 0.25
    assert "| MAP - UNIFORM | +0.750 ± 0.250 | +0.00e+00 ± 0.0e+00 |" in text
