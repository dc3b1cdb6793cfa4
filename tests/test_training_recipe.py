"""Claims about the embedded model's training recipe helpers (scripts/train_tiny_pixart.py, issue #3)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.train_tiny_pixart import sample_timesteps  # noqa: E402


def test_power_one_is_the_uniform_draw_of_the_earlier_stages():
    a = sample_timesteps(64, 1.0, torch.Generator().manual_seed(5))
    b = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_power_two_puts_more_steps_at_high_noise_with_density_proportional_to_t():
    t = sample_timesteps(200_000, 2.0, torch.Generator().manual_seed(0))
    assert int(t.min()) >= 0 and int(t.max()) <= 999
    # density ∝ t ⇒ P(t ≥ 600) = 1 − 0.6² = 0.64 (uniform: 0.40), P(t < 200) = 0.04
    assert abs(float((t >= 600).float().mean()) - 0.64) < 0.01
    assert abs(float((t < 200).float().mean()) - 0.04) < 0.005


def test_non_positive_power_is_refused():
    with pytest.raises(ValueError, match="power"):
        sample_timesteps(4, 0.0, torch.Generator())
