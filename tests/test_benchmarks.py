"""The GPU benchmarks' model builders, checked on CPU without allocating weights (meta device)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.parametrize("name,params_b", [("pixart", 0.61), ("flux", 11.9)])
def test_published_configs_build_with_the_installed_diffusers(name, params_b):
    diffusers = pytest.importorskip("diffusers")
    import bench_e2e

    from dirotq.models import get_adapter

    cls, config = ((diffusers.PixArtTransformer2DModel, bench_e2e.PIXART_SIGMA_1024) if name == "pixart"
                   else (diffusers.FluxTransformer2DModel, bench_e2e.FLUX_DEV))
    kwargs, dropped = bench_e2e.published_config(cls, config)
    assert set(kwargs) | set(dropped) == set(config)
    with torch.device("meta"):
        model = cls(**kwargs)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(params_b, abs=0.01)
    targets = get_adapter(model).targets(model)
    kinds = {spec.kind for spec in targets.values()}
    assert "w4a4" in kinds and "w4a16" in kinds
