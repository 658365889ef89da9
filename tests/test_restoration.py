"""Restoration kit: PROD degradations, NAFNet, data, metrics, pre-training; against closed forms."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bayes_colora import restoration as R
from bayes_colora.predictive import Predictive
from bayes_colora.restoration.nafnet import LayerNorm2d

POLYU = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "restoration" / "polyu"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- degradations

def test_kernels_are_normalised_and_oriented():
    g = R.gaussian_kernel(1.0)
    assert g.shape == (7, 7) and g.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert g[3, 4] / g[3, 3] == pytest.approx(math.exp(-0.5), rel=1e-5)  # exp(-r^2 / 2 sigma^2)
    k = R.line_kernel(5.0, 0.0)  # horizontal: all mass on the middle row
    assert k.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert k[k.shape[0] // 2].sum().item() == pytest.approx(1.0, abs=1e-6)
    kv = R.line_kernel(5.0, math.pi / 2)  # vertical: the middle column
    assert kv[:, kv.shape[1] // 2].sum().item() == pytest.approx(1.0, abs=1e-5)


def test_filters_keep_constant_images_and_noise_has_its_std():
    prod = R.PROD(noise=(0.05, 0.05))
    flat = torch.full((3, 32, 32), 0.4)
    for kind in ("blur", "motion"):  # normalised kernels + reflect padding: a constant stays
        torch.testing.assert_close(prod.apply(flat, [kind], _gen()), flat)
    big = torch.full((3, 128, 128), 0.5)
    noisy = prod.apply(big, ["noise"], _gen())
    # std of 49152 N(0, 0.05^2) draws: relative standard error 1 / sqrt(2 n) ~ 0.3%
    assert (noisy - big).std().item() == pytest.approx(0.05, rel=0.02)


def test_jpeg_and_rain_change_images_as_expected():
    x = R.procedural_images(1, 64, _gen())[0]
    lo = R.PROD(jpeg_quality=(10, 10)).apply(x, ["jpeg"], _gen())
    hi = R.PROD(jpeg_quality=(95, 95)).apply(x, ["jpeg"], _gen())
    assert (hi - x).abs().mean() < (lo - x).abs().mean()  # higher quality, smaller error
    black = torch.zeros(3, 64, 64)
    rain = R.PROD().apply(black, ["rain"], _gen())
    assert (rain >= 0).all() and rain.max() > 0.2  # additive bright streaks, equal in all channels
    torch.testing.assert_close(rain[0], rain[1])


def test_prod_subset_order_and_seed():
    prod = R.PROD()
    orders = [tuple(prod.sample(_gen(s))) for s in range(40)]
    assert all(len(o) >= 1 and len(set(o)) == len(o) for o in orders)
    assert len({o for o in orders if len(o) >= 2}) > 5  # many subsets and orders occur
    x = R.procedural_images(2, 32, _gen())
    torch.testing.assert_close(prod.batch(x, _gen(3)), prod.batch(x, _gen(3)))  # seeded
    assert not torch.equal(prod.batch(x, _gen(3)), prod.batch(x, _gen(4)))
    # the same kinds in another order give another image (blur then noise != noise then blur)
    a = prod.apply(x[0], ["noise", "blur"], _gen(5))
    b = prod.apply(x[0], ["blur", "noise"], _gen(5))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="unknown degradation kinds"):
        R.PROD(kinds=("fog",))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        prod(x, _gen())


# --------------------------------------------------------------------------- network

def test_nafnet_shapes_blocks_and_errors():
    torch.manual_seed(0)
    net = R.nafnet("tiny").eval()
    x = torch.rand(2, 3, 16, 16)
    out = net(x)
    assert out.shape == (2, 6, 16, 16)
    block = R.NAFBlock(8)  # beta = gamma = 0: a fresh block is the identity
    h = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(block(h), h)
    ln = LayerNorm2d(8)
    z = ln(torch.randn(2, 8, 3, 3) * 5 + 2)
    torch.testing.assert_close(z.mean(1), torch.zeros(2, 3, 3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        net(torch.rand(1, 3, 10, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.rand(1, 1, 16, 16))


# --------------------------------------------------------------------------- data and metrics

def test_pair_crops_are_aligned_and_procedural_images_in_range():
    imgs = R.procedural_images(3, 32, _gen())
    assert imgs.shape == (3, 3, 32, 32) and imgs.min() >= 0 and imgs.max() <= 1
    pairs = [(im + 0.25, im) for im in imgs]
    ds = R.PairCrops(pairs, crop=16, crops_per_pair=2, seed=1)
    assert len(ds) == 6
    for i in range(len(ds)):
        a, b = ds[i]
        assert a.shape == (3, 16, 16)
        torch.testing.assert_close(a - b, torch.full_like(a, 0.25))
    with pytest.raises(ValueError, match="exceeds the image size"):
        R.PairCrops(pairs, crop=64)[0]


def test_psnr_ssim_closed_form():
    y = torch.rand(2, 3, 32, 32) * 0.5 + 0.25
    assert R.psnr(y + 0.1, y) == pytest.approx(20.0, abs=1e-3)  # MSE 0.01 -> 20 dB
    assert R.ssim(y, y) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="must both have shape"):
        R.psnr(y, y[0])


def test_evaluate_restoration_ranks_errors():
    g = _gen(2)
    clean = torch.rand(2, 3, 16, 16, generator=g) * 0.5 + 0.25
    scale = torch.rand(2, 1, 16, 16, generator=g).expand(2, 3, 16, 16) * 0.1
    noise = scale * torch.randn(2, 3, 16, 16, generator=g)
    mean = clean + noise
    var = scale ** 2
    good = R.evaluate_restoration(Predictive(mean, var, torch.zeros_like(var), var), clean)
    flat = torch.full_like(var, 0.0025)
    const = R.evaluate_restoration(Predictive(mean, flat, torch.zeros_like(var), flat), clean)
    assert good["aurg"] > 0.005 and abs(const["aurg"]) < 1e-9  # constant uncertainty = chance
    assert abs(good["aurg_epistemic"]) < 1e-12  # zero epistemic variance: all tied, chance
    assert good["aurg_aleatoric"] == good["aurg"]  # total = aleatoric when epistemic is 0
    # the parts are ranked separately: swapped into the epistemic slot, the same std ranks alike
    swapped = R.evaluate_restoration(Predictive(mean, flat, var, flat + var), clean)
    assert swapped["aurg_epistemic"] == pytest.approx(good["aurg"], abs=1e-12)
    assert abs(swapped["aurg_aleatoric"]) < 1e-9
    assert good["ause"] < const["ause"]
    assert good["psnr"] == pytest.approx(R.psnr(mean, clean))


def test_pretrain_lowers_the_loss():
    torch.manual_seed(0)
    net = R.nafnet("tiny")
    prod = R.PROD(kinds=("noise",), noise=(0.1, 0.1))  # one degradation: a smooth loss curve
    losses = R.pretrain(net, list(R.procedural_images(8, 32, _gen())), steps=40, batch_size=4,
                        crop=16, lr=1e-3, prod=prod, progress=False)
    assert len(losses) == 40
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


@pytest.mark.skipif(not POLYU.is_dir(), reason="needs ../shared/data/restoration/polyu (real data)")
def test_polyu_pairs_load():
    pairs = R.polyu_pairs(POLYU, limit=2)
    name, noisy, clean = pairs[0]
    assert noisy.shape == clean.shape == (3, 512, 512)
    # the clean reference is the mean of many shots: the noisy image is close to it (PSNR > 25 dB)
    assert R.psnr(noisy[None], clean[None]) > 25


def test_pack_writes_pairs_and_center_crops(tmp_path):
    from torchvision.io import write_jpeg, write_png

    src = tmp_path / "src"
    (src / "polyu").mkdir(parents=True)
    (src / "clean" / "CBSD68").mkdir(parents=True)
    img = (R.procedural_images(1, 48, _gen())[0] * 255).round().to(torch.uint8)
    write_jpeg(img, str(src / "polyu" / "cam_1_real.JPG"))
    write_jpeg(img, str(src / "polyu" / "cam_1_mean.JPG"))
    write_png(img[:, :40, :], str(src / "clean" / "CBSD68" / "a.png"))
    sizes = R.pack(src, tmp_path / "dst", clean_crop=32)
    assert sizes["polyu"] > 0 and sizes["clean"] > 0
    (name, noisy, clean), = R.polyu_pairs(tmp_path / "dst" / "polyu")
    assert name == "cam_1" and noisy.shape == (3, 48, 48)
    crop = R.load_image(tmp_path / "dst" / "clean" / "CBSD68" / "a.png")
    # the central 32 x 32 window of the 40 x 48 image: rows 4..35, columns 8..39, losslessly
    torch.testing.assert_close(crop, img[:, 4:36, 8:40].float() / 255)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        R.polyu_pairs(tmp_path / "nowhere")
