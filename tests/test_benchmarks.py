"""The benchmark scripts on CPU: GPU model builders on the meta device, result summaries, README
durations, and small end-to-end runs."""

from __future__ import annotations

import math
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

    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    summarize_gpu.main([str(results / "gpu_h100_2026-11-26" / "bench_linear_run3.json"),
                        str(results / "gpu_h200_2026-11-28" / "bench_e2e_flux_run1.json")])
    out = capsys.readouterr().out
    assert "| pixart-sigma ff.net.0.proj | 1152→4608 | 4096 |" in out
    assert "| int_ratio-fused | 80.9 | 62.0 | – | 0.714 |" in out  # no graph_transformer timing in that run
    summarize_gpu.main([str(results / "gpu_h200_2026-11-28" / "bench_linear_run2.json")], "speed")
    out = capsys.readouterr().out
    # the speed table: FP8 and W4A4 × BF16, then the GEMM cores and the Gluon configs in TOPS
    assert "| ff up 3072→12288 | 4096 | 725 | 1.14 | 0.81 |" in out and "| 721 | 360 | 425 | 418 | 525 | 407 |" in out
    assert "| layer | d→o |" not in out  # --table=speed leaves the full table out


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
                 "--work", str(tmp_path / "work"), "--out", str(out), "--html", "--w4a4-only-rows"]) == 0
    res = json.loads(Path(f"{out}.json").read_text())
    rows = {(r["method"], r["budget_rank"], r["policy"]): r for r in res["rows"]}
    for budget in (8, 32):
        fixed = rows[("dirotq-lr", budget, "fixed")]
        for policy in ("output error", "energy", "16-bit budget", "error budget"):
            r = rows[("dirotq-lr", budget, policy)]
            assert r["params16"] <= fixed["params16"] + 1e-6 and "vs_fixed" in r
        assert ("svdquant", budget, "output error") in rows and ("svdquant", budget, "energy") not in rows
        # the allocator's own prediction of its gain sits beside the measured one
        assert "predicted_gain_db" not in fixed
        assert math.isfinite(rows[("dirotq-lr", budget, "output error")]["predicted_gain_db"])
    for policy in ("fixed, format C", "fixed, asymmetric activations", "fixed, format C, asymmetric activations",
                   "output error, tied, format C", "output error, tied, format C, asymmetric activations"):
        assert ("dirotq-lr", 32, policy) in rows
    assert res["sensitivity"]["dirotq-lr"] and Path(f"{out}.md").is_file() and Path(f"{out}.html").is_file()
    # the output-error rows are the tool's allocation: under DiRotQ-LR the weight-only ff.net.2 may hold a
    # branch from the same budget; SVDQuant's plans have none; --w4a4-only-rows adds the W4A4-only reference
    wo = [n for n in res["sensitivity"]["dirotq-lr"] if "ff.net.2" in n]
    assert wo and not any("ff.net.2" in n for n in res["sensitivity"]["svdquant"])
    for budget in (8, 32):
        fixed = rows[("dirotq-lr", budget, "fixed")]
        for policy in ("output error, tied", "output error"):
            assert set(wo) <= set(rows[("dirotq-lr", budget, policy)]["plan"])
            assert not any("ff.net.2" in n for n in rows[("svdquant", budget, policy)]["plan"])
            ref = rows[("dirotq-lr", budget, f"{policy}, W4A4 layers only")]
            assert ref["params16"] <= fixed["params16"] + 1e-6 and "vs_fixed" in ref
            assert not any("ff.net.2" in n for n in ref["plan"]) and "branches_gain" in ref
        assert ("svdquant", budget, "output error, W4A4 layers only") not in rows
    assert "What the weight-only layers' 16-bit branches add" in Path(f"{out}.md").read_text()
    assert res["meta"]["sensitivity_on"].startswith("what the sampler steps with")
    # --tied-only: the default allocation against the fixed rank, nothing else (a confirmation run)
    assert main(["--model", str(tmp_path / "pipe"), "--limit", "2", "--steps", "2", "--calib-limit", "4",
                 "--budgets", "8", "--methods", "dirotq-lr", "--policy-methods", "none", "--no-extras", "--tied-only",
                 "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    tied = json.loads(Path(f"{out}.json").read_text())["rows"]
    assert [r["policy"] for r in tied] == ["fixed", "output error, tied"]


def test_kernel_names_fall_into_the_step_parts():
    from benchmarks.bench_e2e import kernel_part

    parts = {name: kernel_part(name) for name in (
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", "fmha_cutlassF_bf16_aligned_64x128",
        "aten::_scaled_dot_product_flash_attention_for_cpu", "act_quant_kernel", "w4a4_gemm_kernel",
        "gluon_tma_gemm_kernel", "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "sm90_xmma_gemm_bf16bf16_bf16f32",
        "aten::addmm", "triton_poi_fused_add_mul_native_layer_norm_0", "aten::gelu")}
    assert [p for p in parts.values()] == ["attention"] * 3 + ["activation quantization"] + ["gemm"] * 5 + ["other"] * 2


def test_predicted_gain_is_the_ratio_of_summed_curve_errors():
    from benchmarks.bench_rank_plans import predicted_gain_db

    curves = {"a": {0: 1.0, 8: 0.5}, "b": {0: 1.0, 8: 0.1}}
    # fixed: 0.5 + 0.1; the plan moves a's rank to b's side of the budget: 1.0 + 0.1
    assert predicted_gain_db(curves, {"a": 8, "b": 8}, {"a": 0, "b": 8}) == pytest.approx(10 * math.log10(0.6 / 1.1))
    assert predicted_gain_db(curves, {"a": 8, "b": 8}, {"a": 8, "b": 8}) == 0.0


def test_fusion_benchmark_runs_on_a_tiny_pipeline_and_finds_identical_images(tmp_path):
    import json

    from benchmarks.bench_fusion_cpu import main
    from tests.tiny_pipelines import build_tiny_pixart_pipeline

    build_tiny_pixart_pipeline(seed=0).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "fusion.json"
    assert main(["--model", str(tmp_path / "pipe"), "--steps", "2", "--runs", "1", "--rank", "16",
                 "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["images_identical"] and res["fused_groups"] == 2 and res["fused_members"] == 6
    assert res["activations_in_epilogue"] == 2 and res["seconds_per_image"]["deployment"]["median"] > 0
    assert res["quantized_layers_per_forward"]["fused"] == res["quantized_layers_per_forward"]["apart"] - 4
    assert res["seconds_per_image"]["fused"]["median"] > 0


def test_explorer_device_check_runs_the_generate_path_on_cpu(tmp_path):
    """The GPU script for the explorer's Generate path, on the CPU: calibrates, edits one rank,
    generates, and records the backend line (reference here, Triton on a GPU) and the PSNR."""
    import json

    from benchmarks.explorer_gpu_check import main
    from tests.tiny_pipelines import build_tiny_pixart_pipeline

    build_tiny_pixart_pipeline(seed=0).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "explorer.json"
    assert main(["--device", "cpu", "--model", str(tmp_path / "pipe"), "--steps", "2", "--calib-prompts", "2",
                 "--prompt", "a red circle on the left", "--out", str(out), "--cuda-graphs"]) == 0
    res = json.loads(out.read_text())
    assert res["last_stage"] == "generated with CUDA graphs"
    assert res["backend"].startswith("reference:") and not res["triton"]
    # off CUDA the graph wrapper runs every step eagerly: the images are the eager ones
    graphs = res["cuda_graphs"]
    assert graphs["quantized"]["captures"] == 0 and graphs["quantized"]["eager"] == 2 * 2  # 2 images × 2 steps
    assert graphs["psnr_vs_eager_db"]["quantized"] > 100 and len(graphs["runs"]) == 2
    assert "fused from" in res["backend"] and res["metrics"]["psnr_db"] > 0
    assert (tmp_path / "explorer_w4a4.png").is_file()


def test_cross_kv_study_runs_end_to_end_on_a_tiny_pipeline(tmp_path):
    """bench_cross_kv on a tiny random PixArt pipeline: the 16-bit, W4A16 and W4A4 rows of the
    cross-attention K/V, the quantized layer counts, paired differences, smaller checkpoints."""
    import json

    from benchmarks.bench_cross_kv import main
    from tests.tiny_pipelines import build_tiny_pixart_pipeline

    build_tiny_pixart_pipeline(seed=0).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out" / "ckv"
    assert main(["--model", str(tmp_path / "pipe"), "--limit", "2", "--steps", "2", "--calib-limit", "2",
                 "--formats", "exact", "--rank", "16", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    rows = {r["cross_kv"]: r for r in json.loads(Path(f"{out}.json").read_text())["rows"]}
    assert list(rows) == ["16-bit", "W4A16", "W4A4"]
    n_blocks = 2
    base = rows["16-bit"]["targets"]
    assert rows["W4A16"]["targets"] == {"w4a4": base["w4a4"], "w4a16": base["w4a16"] + 2 * n_blocks}
    assert rows["W4A4"]["targets"] == {"w4a4": base["w4a4"] + 2 * n_blocks, "w4a16": base["w4a16"]}
    assert rows["W4A16"]["checkpoint_bytes"] < rows["16-bit"]["checkpoint_bytes"]
    assert "vs_16bit" in rows["W4A4"] and "vs_16bit" not in rows["16-bit"]
    assert "| exact | W4A16 |" in Path(f"{out}.md").read_text()


def test_conditioning_study_runs_end_to_end_on_a_tiny_pipeline(tmp_path):
    """bench_conditioning on a tiny random PixArt pipeline: the conditioning linears outside the blocks
    as W4A16 (RTN, GPTQ) and W8A16, alone, split and with the cross-attention K/V; the layers become
    targets of the row's kind, 8-bit weights store more than 4-bit, paired differences."""
    import json

    from benchmarks.bench_conditioning import main
    from tests.tiny_pipelines import build_tiny_pixart_pipeline

    build_tiny_pixart_pipeline(seed=0).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out" / "cond"
    assert main(["--model", str(tmp_path / "pipe"), "--limit", "2", "--steps", "2", "--calib-limit", "2",
                 "--formats", "exact", "--rank", "16", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(Path(f"{out}.json").read_text())["rows"]}
    assert list(rows) == ["default", "conditioning W4A16", "conditioning W4A16, GPTQ", "conditioning W8A16",
                          "timestep + adaLN W4A16", "text projection W4A16", "cross-attn K/V W4A16",
                          "cross-attn K/V W4A16 + conditioning W8A16", "cross-attn K/V W4A16 + conditioning W4A16, GPTQ"]
    base = rows["default"]["targets"]
    assert rows["conditioning W4A16"]["targets"]["w4a16"] == base["w4a16"] + 5  # timestep ×2, adaLN, caption ×2
    assert rows["conditioning W8A16"]["targets"]["w8a16"] == 5
    assert rows["conditioning W4A16, GPTQ"]["conditioning_config"]["weights"] == "gptq"
    b = {k: r["checkpoint_bytes"] for k, r in rows.items()}
    assert b["conditioning W4A16"] == b["conditioning W4A16, GPTQ"] < b["conditioning W8A16"] < b["default"]
    # GPTQ moves the weights: not the RTN row's images
    assert rows["conditioning W4A16, GPTQ"]["per_image_psnr"] != rows["conditioning W4A16"]["per_image_psnr"]
    assert all("vs_default" in r for k, r in rows.items() if k != "default")
    assert "| exact | conditioning W8A16 |" in Path(f"{out}.md").read_text()


def test_ff_down_study_runs_end_to_end_on_a_tiny_pipeline(tmp_path):
    """bench_ff_down on a tiny random PixArt pipeline: ff.net.2 as W4A16 (the reference row), then W4A4
    at rank 0, r and 2r: the ranks reach the layers (the checkpoint grows with them), paired differences."""
    import json

    from benchmarks.bench_ff_down import main
    from tests.tiny_pipelines import build_tiny_pixart_pipeline

    build_tiny_pixart_pipeline(seed=0).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out" / "ffd"
    assert main(["--model", str(tmp_path / "pipe"), "--limit", "2", "--steps", "2", "--calib-limit", "2",
                 "--rank", "8", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    rows = {r["ff_down"]: r for r in json.loads(Path(f"{out}.json").read_text())["rows"]}
    assert list(rows) == ["W4A16", "W4A4 r0 (tile-local)", "W4A4 r8", "W4A4 r16"]
    assert [rows[k]["kind"] for k in rows] == ["w4a16", "w4a4", "w4a4", "w4a4"]
    sizes = [rows[k]["checkpoint_bytes"] for k in ("W4A4 r0 (tile-local)", "W4A4 r8", "W4A4 r16")]
    assert sizes[0] < sizes[1] < sizes[2]  # each rank step adds the layers' 16-bit branches
    assert "vs_w4a16" in rows["W4A4 r8"] and "vs_w4a16" not in rows["W4A16"]
    assert "| exact | W4A4 r0 (tile-local) |" in Path(f"{out}.md").read_text()


def test_bench_e2e_dry_run_with_compile_runs_on_cpu(tmp_path):
    """The GPU end-to-end script's code path on CPU (tiny configs, Triton interpreted): bf16 and W4A4
    format C, each also under torch.compile as one graph without breaks."""
    import json
    import subprocess
    import sys

    out = tmp_path / "e2e.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_e2e", "--dry-run", "--model", "pixart", "--formats",
                        "int_ratio", "int_ratio-fused", "int_ratio-fused-1launch-tm", "w4a16-int_ratio", "--compile",
                        "default", "--out", str(out)],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for variant in ("bf16", "int_ratio", "int_ratio-fused", "int_ratio-fused-1launch-tm", "w4a16-int_ratio"):
        c = res["variants"][variant]["compiled"]
        assert c["graphs"] == 1 and c["graph_breaks"] == 0 and c["eager_ms"] > 0 and c["output_finite"]
        assert res["variants"][variant]["output_finite"]
    assert res["variants"]["int_ratio"]["backend"].startswith("triton")
    # where the step's time goes, by part (CPU op time in the dry run: the code path)
    for variant in ("bf16", "int_ratio"):
        b = res["variants"][variant]["breakdown"]
        assert b["total_ms"] > 0 and b["ms"]["attention"] > 0 and b["ms"]["gemm"] > 0
        assert abs(sum(b["share"].values()) - 1) < 1e-3 and b["attention_share"] == b["share"]["attention"]
    # (the interpreted Triton kernels are no profiler ops: on a GPU they are kernels, named as below)
    assert "compiled_speedup_vs_bf16_compiled" in res["variants"]["int_ratio"]
    # the default --pixart-cross-kv w4a16: 2 blocks × (ff.net.2, attn2.to_k, attn2.to_v) weight-only
    assert res["pixart_cross_kv"] == "w4a16" and res["targets"] == {"w4a4": 14, "w4a16": 6}
    assert res["variants"]["int_ratio"]["layers"] == res["targets"]
    # per block, the self-attention q/k/v and the cross-attention K/V (W4A16 here) run as one layer each,
    # and the MLP's GELU runs in its up-projection's epilogue; compiled as one graph with both fusions
    fused = res["variants"]["int_ratio-fused"]
    assert fused["fused"] == {"groups": 4, "layers": 10, "activations_in_epilogue": 2}
    assert fused["backend"].startswith("triton") and "2 apply their gelu_tanh in the GEMM epilogue" in fused["backend"]
    assert fused["memory"]["bytes"] <= res["variants"]["int_ratio"]["memory"]["bytes"]
    # the GPU run's table reader takes the file, a skipped variant included (FP8 without an FP8 GPU)
    from benchmarks import summarize_gpu

    res["variants"]["fp8-torchao"] = {"skipped": "no FP8 GPU"}
    table = summarize_gpu.e2e_table(res)
    assert "| int_ratio-fused | " in table and "| fp8-torchao | no FP8 GPU |" in table
    w4a16 = res["variants"]["w4a16-int_ratio"]
    assert w4a16["layers"] == {"w4a4": 0, "w4a16": 20} and w4a16["backend"] == "triton: 20× W4A16 format C (int_ratio)"
    assert 0 < w4a16["memory"]["bytes"] < res["variants"]["int_ratio"]["memory"]["bytes"]
    assert w4a16["memory"]["quant_layers_weights"] == res["variants"]["int_ratio"]["memory"]["quant_layers_weights"]
    assert 0 < w4a16["memory_ratio_vs_bf16"] < 1


def test_bench_e2e_compiles_block_by_block_on_cpu(tmp_path):
    """``--compile-scope blocks`` (what the GPU script runs): every block compiled in place, identical
    blocks sharing their graphs, the compiled step's output the eager one's."""
    import json
    import subprocess
    import sys

    out = tmp_path / "e2e.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_e2e", "--dry-run", "--model", "flux", "--formats",
                        "int_ratio-fused", "--compile", "default", "--compile-scope", "blocks", "--no-graphs",
                        "--out", str(out)],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for variant in ("bf16", "int_ratio-fused"):
        c = res["variants"][variant]["compiled"]
        assert c["scope"] == "blocks" and c["graph_breaks"] == 0 and c["output_finite"]
        # FLUX's two block types, each at most once more for its first block's input strides
        assert 2 <= c["graphs"] <= 4
        assert c["rel_err_vs_eager"] < 1e-2
        # where the variant's wall time went, phase by phase (what the GPU script's time boxes must hold)
        phases = res["variants"][variant]["phase_s"]
        assert list(phases) == ["build", "quantize", "eager", "breakdown", "compile_and_time"]
        assert all(v >= 0 for v in phases.values())


def test_host_overhead_benchmark_runs(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "host.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_host_overhead", "--calls", "20", "--out", str(out)],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["layer"]: row for row in json.loads(out.read_text())["rows"]}
    # format C W4A4: the c GEMM on cuBLAS, two activation passes and the GEMM are Triton launches
    assert rows["pixart attn (W4A4)"]["launches_per_call"] == 3
    assert rows["pixart ff.net.2 (W4A16)"]["launches_per_call"] == 1
    assert all(row["host_us_per_call"] > 0 for row in rows.values())


@pytest.mark.parametrize("cross_kv", ["16bit", "w4a16"])
def test_bench_e2e_variants_quantize_the_same_layers(cross_kv):
    """W4A4 format C and W4A16 format C replace the same layers (PixArt's cross-attention K/V only
    with --pixart-cross-kv w4a16): W4A4 targets with 4-bit activations in the first, every target
    weight-only in the second; what is not a target stays nn.Linear."""
    pytest.importorskip("diffusers")
    from benchmarks import bench_e2e
    from dirotq.models import ADAPTERS
    from dirotq.modules import QuantLinear

    for variant in ("int_ratio", "w4a16-int_ratio"):
        model = ADAPTERS["pixart"].build_tiny(0)
        targets = bench_e2e.bench_targets(model, cross_kv)
        counts = bench_e2e.quantize_model(model, variant, 32, cross_kv)
        assert sum(counts.values()) == len(targets) == (20 if cross_kv == "w4a16" else 16)
        for name, spec in targets.items():
            q = model.get_submodule(name)
            assert isinstance(q, QuantLinear) and q.scale_format == "int_ratio"
            assert q.act_bits == (4 if variant == "int_ratio" and spec.kind == "w4a4" else None)
        for blk in model.transformer_blocks:
            for lin in (blk.attn2.to_k, blk.attn2.to_v):
                assert isinstance(lin, QuantLinear if cross_kv == "w4a16" else torch.nn.Linear)
                if cross_kv == "w4a16":
                    assert lin.act_bits is None
        assert isinstance(model.proj_out, torch.nn.Linear)  # kept 16-bit by the adapter in every variant


def test_tensor_bytes_counts_a_torchao_fp8_weight_by_its_inner_tensors():
    """torchao's FP8 weight reports the bf16 shape and dtype it stands for; the benchmark's byte
    counter reads its FP8 data and scales instead: about 1 byte per element + one scale per row."""
    pytest.importorskip("torchao")
    from torchao.quantization import Float8Tensor, PerRow

    from benchmarks import bench_e2e

    o, d = 48, 128
    lin = torch.nn.Linear(d, o, dtype=torch.bfloat16)
    if bench_e2e.fp8_unavailable_reason("cpu") is None:
        from torchao.quantization import quantize_

        quantize_(lin, bench_e2e._fp8_config())
        w = lin.weight
    else:  # torchao's quantize_ refuses FP8 without an FP8 GPU: the same tensor type from the plain weight
        w = Float8Tensor.from_hp(lin.weight.detach(), granularity=PerRow())
    assert w.dtype == torch.bfloat16 and w.element_size() == 2  # what a plain numel × element_size would count
    n = bench_e2e.tensor_bytes(w)
    assert o * d <= n <= o * d + 8 * o
    assert bench_e2e.tensor_bytes(lin.bias) == 2 * o


def test_fp8_torchao_variant_quantizes_the_targets_and_counts_what_torchao_leaves(monkeypatch):
    """The FP8 variant's code path on CPU, with torchao's hardware assertion lifted (torch._scaled_mm
    runs on CPU; torchao's quantize_ only asserts an FP8 GPU): only the named targets become FP8,
    a layer whose widths are not multiples of 16 stays bf16 and is named, and the byte count drops."""
    pytest.importorskip("torchao")
    from torchao.quantization import quant_api
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    from benchmarks import bench_e2e

    if bench_e2e.fp8_unavailable_reason("cpu") is not None:
        if not hasattr(quant_api, "_check_hardware_support"):
            pytest.skip("torchao refuses FP8 on CPU and its hardware check moved")
        monkeypatch.setattr(quant_api, "_check_hardware_support", lambda *a, **k: None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 24),
                                torch.nn.Linear(24, 32)).to(torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    before = bench_e2e.weight_bytes(model)["bytes"]
    counts = bench_e2e.quantize_fp8_torchao(model, {"0": None, "2": None})
    assert counts == {"fp8": 1, "kept_bf16": 1, "kept_bf16_layers": ["2"]}
    assert is_traceable_wrapper_subclass(model[0].weight) and not is_traceable_wrapper_subclass(model[3].weight)
    mem = bench_e2e.weight_bytes(model)
    assert mem["tensor_subclass_weights"] == 128 * 64 and mem["tensor_subclass_bytes"] < 2 * 128 * 64
    assert before - mem["bytes"] == 2 * 128 * 64 - mem["tensor_subclass_bytes"]
    with torch.no_grad():
        y = model(x)
    assert torch.isfinite(y).all() and (y - ref).abs().max() < 0.1 * ref.abs().max()


def test_bench_e2e_dry_run_fp8_torchao_runs_or_says_why(tmp_path):
    """With torchao installed, the dry run's FP8 entry either ran (finite output, fewer bytes than
    bf16) or carries the reason it was skipped; the run itself goes on."""
    pytest.importorskip("torchao")
    import json
    import subprocess
    import sys

    out = tmp_path / "e2e.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_e2e", "--dry-run", "--model", "pixart", "--formats",
                        "fp8-torchao", "--out", str(out)],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    e = res["variants"]["fp8-torchao"]
    assert "failed" not in e, e
    if "skipped" in e:
        assert "FP8" in e["skipped"] and len(e) == 1
    else:
        assert e["output_finite"] and e["layers"]["fp8"] == sum(res["targets"].values())
        assert e["memory"]["bytes"] < res["variants"]["bf16"]["memory"]["bytes"]


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
    assert "C_dirotq-lr_r32_1launch_act_quant_ms" in text and "C_dirotq-lr_r32_w8_gemm_ms" in text
    assert "C_dirotq-lr_r32_tm_gemm_ms" in text
    assert "C_gemm_gelu_epilogue_ms" in text and "C_gemm_then_gelu_ms" in text
    # the TMA-fed GEMM's columns (on the CPU its layout falls back to the swap kernel: the path, not the kernel)
    assert "C_dirotq-lr_r32_tma_gemm_ms" in text and "C_dirotq-lr_r32_w8_tma_gemm_ms" in text
    assert "_error" not in text


def test_bench_e2e_conditioning_linears_as_w8a16():
    """--conditioning w8a16: the conditioning linears outside the blocks become 8-bit weight-only
    layers in every quantized variant, counted apart; the step still runs (here on the reference path)."""
    pytest.importorskip("diffusers")
    from benchmarks import bench_e2e
    from dirotq.models import ADAPTERS
    from dirotq.modules import QuantLinear

    model = ADAPTERS["pixart"].build_tiny(0)
    example = ADAPTERS["pixart"].example_inputs(model, 2, torch.Generator().manual_seed(0))
    counts = bench_e2e.quantize_model(model, "int_ratio", 32, "w4a16", "w8a16")
    assert counts == {"w4a4": 14, "w4a16": 6, "w8a16": 5}
    for name in ("adaln_single.linear", "caption_projection.linear_1"):
        q = model.get_submodule(name)
        assert isinstance(q, QuantLinear) and q.weight_bits == 8 and q.act_bits is None
    assert isinstance(model.proj_out, torch.nn.Linear)
    with torch.no_grad():
        assert torch.isfinite(model(**example, return_dict=False)[0]).all()
    with pytest.raises(ValueError, match="conditioning"):
        bench_e2e.bench_targets(model, "w4a16", "w2a16")


@pytest.mark.parametrize("variant", ["bf16", "int_ratio", "int_ratio-fused"])
def test_weight_memory_by_part_extrapolates_to_the_byte(variant):
    """bench_weight_memory's sum (bytes outside the blocks + depth × a block's bytes) of a one-block-
    per-kind build equals the bytes of the deeper model counted whole, quantized and fused or not."""
    pytest.importorskip("diffusers")
    from benchmarks import bench_e2e
    from benchmarks.bench_weight_memory import bytes_by_part, full_depth_bytes
    from dirotq.fusion import fuse_for_inference
    from dirotq.models import ADAPTERS

    def convert(model):
        if variant != "bf16":
            bench_e2e.quantize_model(model, variant, 16, "w4a16", "w8a16")
        if variant in bench_e2e.FUSED_VARIANTS:
            assert fuse_for_inference(model)["shared_inputs"]["fused"]
        return model

    deep = convert(ADAPTERS["flux"].build_tiny(0))
    depth = {"transformer_blocks": len(deep.transformer_blocks),
             "single_transformer_blocks": len(deep.single_transformer_blocks)}
    assert min(depth.values()) >= 2
    parts = bytes_by_part(deep)
    assert set(parts["blocks"]) == set(depth) and all(len(v) == depth[k] for k, v in parts["blocks"].items())
    assert full_depth_bytes(parts, depth) == bench_e2e.weight_bytes(deep)["bytes"]
    shallow = ADAPTERS["flux"].build_tiny(0)
    shallow.transformer_blocks = shallow.transformer_blocks[:1]
    shallow.single_transformer_blocks = shallow.single_transformer_blocks[:1]
    assert full_depth_bytes(bytes_by_part(convert(shallow)), depth) == bench_e2e.weight_bytes(deep)["bytes"]
    uneven = {"outside": 10, "blocks": {"transformer_blocks": [4, 5]}}
    with pytest.raises(ValueError, match="differ in bytes"):
        full_depth_bytes(uneven, {"transformer_blocks": 19})
