"""Per-image depth metrics and the paired engine-minus-MAP differences with their standard errors."""

import pytest
import torch

import bayes_colora as bc
from bayes_colora.depth import evaluate_depth
from bayes_colora.depth import experiment as E
from bayes_colora.depth.metrics import depth_per_image


def predictive(seed: int, gt: torch.Tensor) -> bc.Predictive:
    """A noisy float64 predictive of ``gt`` with a random per-pixel variance."""
    g = torch.Generator().manual_seed(seed)
    mean = gt + 0.3 * torch.randn(gt.shape, generator=g, dtype=torch.float64)
    var = 0.01 + 0.2 * torch.rand(gt.shape, generator=g, dtype=torch.float64)
    return bc.Predictive(mean=mean, aleatoric=var, epistemic=torch.zeros_like(var), total=var)


def depths_with_holes(seed: int = 0) -> torch.Tensor:
    """(5, 1, 6, 7) depths in [0.5, 10] m; image 1 has holes, image 3 has no valid pixel."""
    g = torch.Generator().manual_seed(seed)
    gt = 0.5 + 9.5 * torch.rand(5, 1, 6, 7, generator=g, dtype=torch.float64)
    gt[1, 0, :2] = 0.0
    gt[3] = 0.0
    return gt


def test_per_image_values_reproduce_the_aggregates():
    gt = depths_with_holes()
    pred = predictive(1, gt)
    per = depth_per_image(pred, gt, max_depth=9.0)
    agg = evaluate_depth(pred, gt, max_depth=9.0)
    valid = (gt > 1e-3) & (gt < 9.0)
    assert per["n_valid"] == [int(v) for v in valid.flatten(1).sum(1)]
    assert per["n_valid"][3] == 0 and per["nll"][3] is None and per["ause_rmse"][3] is None
    kept = [b for b, n in enumerate(per["n_valid"]) if n > 0]
    n = [per["n_valid"][b] for b in kept]
    # the pooled NLL is the valid-pixel-weighted mean of the per-image means (float64 sums)
    pooled = sum(w * per["nll"][b] for w, b in zip(n, kept)) / sum(n)
    assert pooled == pytest.approx(agg["nll"], rel=1e-12)
    # the unweighted mean differs: the images have different valid-pixel counts
    assert len(set(n)) > 1
    for name in ("ause_rmse", "ause_abs_rel"):
        assert sum(per[name][b] for b in kept) / len(kept) == pytest.approx(agg[name], rel=1e-12)
        assert all(per[name][b] >= 0 for b in kept)  # model area >= oracle area


def row(engine: str, seed: int, gt: torch.Tensor) -> dict:
    pred = predictive(seed, gt)
    return {"model": "m", "adapter": "a", "engine": engine, **evaluate_depth(pred, gt),
            "per_image": depth_per_image(pred, gt)}


def test_paired_to_map_is_the_difference_of_the_aggregates():
    gt = depths_with_holes(seed=4)
    rows = [row("map", 5, gt), row("swag", 6, gt)]
    (entry,) = E.paired_to_map(rows)
    for metric in ("nll", "ause_rmse", "ause_abs_rel"):
        want = rows[1][metric] - rows[0][metric]
        assert entry[metric]["mean"] == pytest.approx(want, rel=1e-10, abs=1e-13), metric
        assert entry[metric]["frames"] == 4  # image 3 has no valid pixel
    assert entry["meets_target"] == (entry["nll"]["mean"] < 0 and entry["ause_rmse"]["mean"] < 0)
    # a MAP row compared with itself: every difference 0, no target met
    (same,) = E.paired_to_map([rows[0], {**rows[0], "engine": "vi"}])
    assert same["nll"]["mean"] == 0 and same["nll"]["se_frame"] == 0 and same["meets_target"] is False


def test_old_rows_without_per_image_render_dashes():
    gt = depths_with_holes(seed=7)
    new_map, new_vi = row("map", 8, gt), row("vi", 9, gt)
    old_swag = {k: v for k, v in row("swag", 10, gt).items() if k != "per_image"}
    table = E.paired_table([new_map, old_swag, new_vi])
    lines = table.strip().splitlines()
    assert len(lines) == 4  # header, rule, swag, vi
    swag, vi = lines[2].split(" | "), lines[3].split(" | ")
    assert swag[2] == "swag" and swag[3:] == ["-", "-", "-", "-", "- |"]
    assert vi[2] == "vi" and vi[3] == "4" and "±" in vi[4]
    assert vi[-1].rstrip(" |") in ("yes", "no")
    # 5 test images < 40: no block SE
    assert "[± -]" in vi[4]
    # an old MAP row: nothing to pair with
    old_map = {k: v for k, v in new_map.items() if k != "per_image"}
    assert E.paired_table([old_map, new_vi]).strip().splitlines()[2].endswith("| - | - | - | - | - |")


def test_meets_target_beyond_two_block_ses():
    """``meets_target_2se``: both the NLL and the AUSE-RMSE differences lie below minus twice their
    block SE. Hand-made per-frame differences over 4 blocks of 2 frames: block means b_k, block
    SE = sd(b_k) / sqrt(4)."""
    frames = 8

    def rows(nll_diff, ause_diff):
        base = {"n_valid": [10] * frames, "nll": [1.0] * frames, "ause_rmse": [0.5] * frames,
                "ause_abs_rel": [0.2] * frames}
        other = {**base, "nll": [1.0 + d for d in nll_diff], "ause_rmse": [0.5 + d for d in ause_diff]}
        return [{"model": "m", "adapter": "a", "engine": "map", "per_image": base},
                {"model": "m", "adapter": "a", "engine": "vi", "per_image": other}]

    # block means -1.0, -1.2, -0.8, -1.0: mean -1, sd 0.1633, block SE 0.0816 -> far beyond 2 SE
    far = [-1.0, -1.0, -1.2, -1.2, -0.8, -0.8, -1.0, -1.0]
    # block means -0.1, -0.3, +0.1, -0.1: mean -0.1, block SE 0.0816 -> 1.2 SE, negative but not beyond
    near = [-0.1, -0.1, -0.3, -0.3, 0.1, 0.1, -0.1, -0.1]
    (both,) = E.paired_to_map(rows(far, far), block=2)
    assert both["nll"]["se_block"] == pytest.approx(0.16330 / 2, rel=1e-4)
    assert both["meets_target"] is True and both["meets_target_2se"] is True
    (one,) = E.paired_to_map(rows(far, near), block=2)
    assert one["meets_target"] is True and one["meets_target_2se"] is False
    assert E.paired_table(rows(far, far), block=2).strip().endswith("| yes, beyond 2 block SE |")
    assert E.paired_table(rows(far, near), block=2).strip().endswith("| yes |")
    (short,) = E.paired_to_map(rows(far, far), block=5)  # 8 frames < 2 blocks of 5: no block SE
    assert short["meets_target"] is True and short["meets_target_2se"] is None


def _two_engine_rows(frames: int = 8) -> list[dict]:
    """A MAP and two engines over ``frames`` hand-made per-frame values: VI lowers NLL by 1 and
    AUSE-RMSE by 0.1 in every frame, SWAG raises both by 0.5 and 0.05."""
    base = {"n_valid": [10] * frames, "nll": [1.0] * frames, "ause_rmse": [0.5] * frames,
            "ause_abs_rel": [0.2] * frames}

    def shifted(dn, da):
        return {**base, "nll": [1.0 + dn] * frames, "ause_rmse": [0.5 + da] * frames}
    return [{"model": "m", "adapter": "a", "engine": "map", "per_image": base},
            {"model": "m", "adapter": "a", "engine": "vi", "per_image": shifted(-1.0, -0.1)},
            {"model": "m", "adapter": "a", "engine": "swag", "per_image": shifted(0.5, 0.05)}]


def test_paired_scatter_puts_each_cell_at_its_differences(tmp_path):
    from bayes_colora.depth import plots as P

    entries = E.paired_to_map(_two_engine_rows(), block=2)
    fig = P.paired_scatter(entries, path=tmp_path / "scatter.png")
    (ax,) = fig.axes
    points = {c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata()))
              for c in ax.containers}
    assert points["vi (1 of 1 in the quadrant)"] == (pytest.approx([-1.0]), pytest.approx([-0.1]))
    assert points["swag (0 of 1 in the quadrant)"] == (pytest.approx([0.5]), pytest.approx([0.05]))
    assert (tmp_path / "scatter.png").stat().st_size > 0
    old = [{**r, "per_image": None} if r["engine"] != "map" else r for r in _two_engine_rows()]
    with pytest.raises(ValueError, match="none has them"):
        P.paired_scatter(E.paired_to_map(old))


def test_paired_to_map_against_another_reference_row():
    """``against={"vi": "vi-mean"}``: only VI, paired with its own mean's row (the spread's part),
    not with the MAP."""
    rows = _two_engine_rows()
    mean_row = {**rows[1], "engine": "vi-mean",
                "per_image": {**rows[1]["per_image"], "nll": [0.25] * 8}}
    (entry,) = E.paired_to_map(rows + [mean_row], block=2, against={"vi": "vi-mean"})
    assert entry["engine"] == "vi" and entry["against"] == "vi-mean"
    assert entry["nll"]["mean"] == pytest.approx(0.0 - 0.25)  # vi's NLL is 1 - 1 = 0 per frame
    assert entry["ause_rmse"]["mean"] == pytest.approx(0.0)
    assert [e["against"] for e in E.paired_to_map(rows + [mean_row], block=2)] == ["map", "map", "map"]
