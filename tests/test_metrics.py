"""Claims about the image metrics (dirotq/eval/metrics.py): PSNR of a known noise level, SSIM of identical
images, bootstrap intervals, and learned metrics that refuse to run without local weights."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dirotq.eval.metrics import (MetricUnavailable, bootstrap_ci, clip_score, fid, lpips, paired_bootstrap_diff, psnr,
                              psnr_batch, ssim, ssim_batch, to_tensor)


def _smooth_images(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) * 0.6 + 0.2


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.1])
def test_psnr_of_gaussian_noise_is_20_log10_one_over_sigma(sigma):
    a = torch.full((2, 3, 64, 64), 0.5)
    b = a + sigma * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    expected = 20 * math.log10(1 / sigma)
    assert abs(psnr(a, b) - expected) < 0.1
    assert all(abs(v - expected) < 0.2 for v in psnr_batch(a, b))


def test_psnr_identical_is_inf_and_data_range_scales():
    a = _smooth_images()
    assert psnr(a, a) == math.inf
    b = (a + 0.01).clamp(0, 1)
    assert abs(psnr(a * 255, b * 255, data_range=255.0) - psnr(a, b)) < 1e-6


def test_ssim_identical_is_one_and_drops_with_noise():
    a = _smooth_images()
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-9)
    noisy = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    vals = ssim_batch(a, noisy)
    assert len(vals) == 4 and all(v < 0.9 for v in vals)


def test_ssim_on_tiny_images_and_pil_inputs():
    a = _smooth_images(n=1, size=8)
    pil = Image.fromarray((a[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    assert ssim(pil, pil) == pytest.approx(1.0, abs=1e-9)
    assert to_tensor([pil, pil]).shape == (2, 3, 8, 8)
    assert to_tensor(np.zeros((8, 8, 3), np.uint8)).shape == (1, 3, 8, 8)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 16, 16))


def test_bootstrap_ci_contains_the_mean_and_is_seeded():
    v = np.random.default_rng(0).normal(20.0, 2.0, size=50)
    mean, lo, hi = bootstrap_ci(v, n_boot=500, seed=3)
    assert lo < mean < hi and mean == pytest.approx(v.mean())
    assert (lo, hi) == bootstrap_ci(v, n_boot=500, seed=3)[1:]
    # the interval of the mean shrinks like 1/sqrt(n)
    _, lo4, hi4 = bootstrap_ci(np.tile(v, 4), n_boot=500)
    assert hi4 - lo4 < 0.7 * (hi - lo)
    assert bootstrap_ci([3.0]) == (3.0, 3.0, 3.0)


def test_paired_difference_sees_a_consistent_small_gain():
    rng = np.random.default_rng(0)
    base = rng.normal(20, 3, size=40)  # large per-image spread shared by both methods
    a = base + 0.3 + rng.normal(0, 0.05, size=40)
    d = paired_bootstrap_diff(a, base, n_boot=500)
    assert d["lo"] > 0.2 and d["win_rate"] > 0.95


def test_learned_metrics_without_local_weights_are_unavailable_with_a_reason(tmp_path):
    a = _smooth_images(n=2)
    with pytest.raises(MetricUnavailable, match=r"no local Inception weights \(--fid-weights\)"):
        fid(a, a)
    with pytest.raises(MetricUnavailable, match="not found"):
        fid(a, a, weights_path=str(tmp_path / "missing.pth"))
    with pytest.raises(MetricUnavailable, match="--lpips-weights"):
        lpips(a, a)
    with pytest.raises(MetricUnavailable, match="--clip-model"):
        clip_score(a, ["x", "y"])
    err = MetricUnavailable("fid", "because")
    assert str(err) == "unavailable: because" and err.metric == "fid"
