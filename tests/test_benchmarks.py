"""The GPU benchmarks' model builders, checked on CPU without allocating weights (meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch



@pytest.mark.parametrize("name,params_b", [("pixart", 0.61), ("flux", 11.9)])
def test_published_configs_build_with_the_installed_diffusers(name, params_b):
    diffusers = pytest.importorskip("diffusers")
    from benchmarks import bench_e2e

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


def test_summarize_gpu_tables_from_committed_results(capsys):
    from benchmarks import summarize_gpu

    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "gpu_h100_2026-11-26"
    summarize_gpu.main([str(results / "bench_linear_run3.json"), str(results / "bench_e2e_flux_run3.json")])
    out = capsys.readouterr().out
    assert "| pixart-sigma ff.net.0.proj | 1152→4608 | 4096 |" in out
    # the FLUX run was stopped before format C: its ratio is computed from what it has
    assert "| exact | 376.0 | 370.2 | 0.483 |" in out


def test_the_readme_quotes_a_measured_duration_for_every_cli_command():
    """README.md's CLI durations come from benchmarks/results/cli_durations_cpu.json, written by
    python -m benchmarks.bench_cli running that README block's commands: same commands, same numbers."""
    import json

    from benchmarks.bench_cli import markdown_rows, readme_commands

    root = Path(__file__).resolve().parent.parent
    result = json.loads((root / "benchmarks" / "results" / "cli_durations_cpu.json").read_text())
    assert result["complete"] and [r["command"] for r in result["commands"]] == readme_commands()
    assert all(r["exit_status"] == 0 for r in result["commands"])
    readme = (root / "README.md").read_text()
    missing = [row for row in markdown_rows(result) if row not in readme]
    assert not missing, missing


def test_gpu_flux_scale_script_runs_end_to_end_on_a_small_cpu_shape(tmp_path):
    """The prepared GPU script (a GPU session has 15 minutes: it must not fail on a typo), at 2 heads
    and 1 + 1 blocks on the CPU; its checkpoint loads."""
    import json

    from benchmarks import gpu_flux_scale
    from dirotq.checkpoint import load_quantized
    from dirotq.modules import QuantLinear

    out = tmp_path / "flux_scale.json"
    assert gpu_flux_scale.main(["--device", "cpu", "--double", "1", "--single", "1", "--heads", "2", "--tokens", "16",
                                "--text-tokens", "8", "--prompts", "1", "--steps", "2", "--budget-gib", "0.02",
                                "--work", str(tmp_path), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["passes"] > 1 and all(s["ok"] for s in doc["stages"])
    model = load_quantized(doc["stages"][-1]["path"])
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == sum(
        s.get("layers", 0) for s in doc["stages"] if s["stage"].startswith("quantize"))
