"""The benchmark scripts on CPU: GPU model builders on the meta device, result summaries, README
durations, and small end-to-end runs."""

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


def test_rank_plan_study_runs_end_to_end_on_a_tiny_pipeline(tmp_path):
    """bench_rank_plans on a tiny random PixArt pipeline: every policy row at each budget, the format
    and asymmetric rows, plans within the budget of the uniform rank, paired differences, files."""
    import json

    from benchmarks.bench_rank_plans import main
    from tests.tiny_pipelines import build_tiny_pixart_pipeline

    build_tiny_pixart_pipeline(seed=0).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out" / "rp"
    assert main(["--model", str(tmp_path / "pipe"), "--limit", "2", "--steps", "2", "--calib-limit", "4",
                 "--budgets", "8,32", "--methods", "dirotq-lr,svdquant", "--policy-methods", "dirotq-lr",
                 "--work", str(tmp_path / "work"), "--out", str(out), "--html"]) == 0
    res = json.loads(Path(f"{out}.json").read_text())
    rows = {(r["method"], r["budget_rank"], r["policy"]): r for r in res["rows"]}
    for budget in (8, 32):
        fixed = rows[("dirotq-lr", budget, "fixed")]
        for policy in ("output error", "energy", "16-bit budget", "error budget"):
            r = rows[("dirotq-lr", budget, policy)]
            assert r["params16"] <= fixed["params16"] + 1e-6 and "vs_fixed" in r
        assert ("svdquant", budget, "output error") in rows and ("svdquant", budget, "energy") not in rows
    for policy in ("fixed, format C", "fixed, asymmetric activations", "fixed, format C, asymmetric activations",
                   "output error, format C", "output error, format C, asymmetric activations"):
        assert ("dirotq-lr", 32, policy) in rows
    assert res["sensitivity"]["dirotq-lr"] and Path(f"{out}.md").is_file() and Path(f"{out}.html").is_file()


def test_bench_e2e_dry_run_with_compile_runs_on_cpu(tmp_path):
    """The GPU end-to-end script's code path on CPU (tiny configs, Triton interpreted): bf16 and W4A4
    format C, each also under torch.compile as one graph without breaks."""
    import json
    import subprocess
    import sys

    out = tmp_path / "e2e.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_e2e", "--dry-run", "--model", "pixart", "--formats",
                        "int_ratio", "--compile", "default", "--out", str(out)],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for variant in ("bf16", "int_ratio"):
        c = res["variants"][variant]["compiled"]
        assert c["graphs"] == 1 and c["graph_breaks"] == 0 and c["eager_ms"] > 0
    assert res["variants"]["int_ratio"]["backend"].startswith("triton")
    assert "compiled_speedup_vs_bf16_compiled" in res["variants"]["int_ratio"]


def test_bench_linear_dry_run_runs_on_cpu(tmp_path):
    """The GPU kernel benchmark's code path on CPU (tiny shapes, Triton interpreted): every variant
    row is written, with the kernels' output equal to the reference."""
    import json
    import subprocess
    import sys

    out = tmp_path / "linear.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_linear", "--dry-run", "--core", "--tokens", "16",
                        "--out", str(out)], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = json.dumps(json.loads(out.read_text()))
    assert "C_dirotq-lr_r32_max_rel_err" in text and "A_rtn_r0_max_rel_err" in text
