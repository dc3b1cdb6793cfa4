"""The command line (dirotq/cli.py): every verb on the tiny random PixArt-Σ pipeline saved to a
folder, and bad input answered with one line and exit status 2 (no traceback)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dirotq.cli import main

PROMPTS = ["a large red circle on the left, on a white background",
           "a small blue square in the top right, on a black background"]
CALIB = ["a red circle", "a green star on the left", "two blue squares"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tests.tiny_pipelines import build_tiny_pixart_pipeline

    root = tmp_path_factory.mktemp("cli")
    model = root / "tiny-pixart"
    build_tiny_pixart_pipeline(seed=0).save_pretrained(model)
    (root / "eval.txt").write_text("# eval prompts\n" + "\n".join(PROMPTS) + "\n")
    (root / "calib.txt").write_text("\n".join(CALIB) + "\n")
    common = ["--model", str(model), "--steps", "2", "--calib-prompts", str(root / "calib.txt")]
    return root, model, common


def test_quantize_dry_run_prints_the_target_report(env, capsys):
    root, model, _ = env
    assert main(["quantize", "--model", str(model), "--dry-run", "--out", str(root / "out")]) == 0
    out = capsys.readouterr().out
    assert "14 W4A4 targets, 2 W4A16" in out and "no unknown names" in out
    assert "dirotq-lr-w4a4-g64-r32-tiny-pixart" in out  # the default method is the deployable dirotq-lr
    assert not (root / "out").exists()  # a dry run writes nothing


def test_quantize_writes_a_checkpoint_named_by_the_recipe(env, capsys, monkeypatch):
    root, model, common = env
    monkeypatch.chdir(root)
    assert main(["quantize", *common, "--method", "dirotq", "--rank", "16", "--out", str(root / "ckpt")]) == 0
    path = root / "ckpt" / "dirotq-w4a4-g64-r16-tiny-pixart"
    assert (path / "config.json").is_file()
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    out = capsys.readouterr().out
    assert f"checkpoint: {path}" in out
    # the default spends rank 16's 16-bit budget by model-output sensitivity, one rank per shared-input
    # group: ranks differ between layers
    assert "ranks by model-output sensitivity (one per shared-input group) at the 16-bit budget of rank 16" in out
    assert "; error measured on what the sampler steps with (first 4 channels, guidance 4.5)" in out
    ranks = {t["rank"] for t in qc["targets"].values() if t.get("kind", "w4a4") == "w4a4"}
    assert len(ranks) > 1
    assert main(["quantize", *common, "--method", "dirotq", "--rank", "16", "--allocate", "fixed",
                 "--out", str(root / "fixed")]) == 0
    qc = json.loads((root / "fixed" / "dirotq-w4a4-g64-r16-tiny-pixart" / "config.json").read_text())
    assert {t["rank"] for t in qc["quantization_config"]["targets"].values() if t.get("kind", "w4a4") == "w4a4"} == {16}
    # the fast kernel's format from the command line, named apart from format A
    assert main(["quantize", *common, "--method", "dirotq-lr", "--rank", "16", "--allocate", "fixed",
                 "--scale-format", "int_ratio", "--out", str(root / "fmtc")]) == 0
    path = root / "fmtc" / "dirotq-lr-w4a4-g64-r16-int_ratio-tiny-pixart"
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["config"]["scale_format"] == "int_ratio"
    from dirotq.checkpoint import load_quantized
    from dirotq.modules import QuantLinear

    mods = [m for m in load_quantized(path).modules() if isinstance(m, QuantLinear)]
    assert mods and all(m.scale_format == "int_ratio" and m.weight_ratio is not None for m in mods)
    # the default ties each shared-input group's ranks: every attention's q/k/v can run fused after loading
    assert main(["quantize", *common, "--method", "dirotq-lr", "--rank", "16", "--out", str(root / "tied")]) == 0
    assert "(one per shared-input group)" in capsys.readouterr().out
    path = root / "tied" / "dirotq-lr-w4a4-g64-r16-tiny-pixart"
    targets = json.loads((path / "config.json").read_text())["quantization_config"]["targets"]
    for blk in (0, 1):
        assert len({targets[f"transformer_blocks.{blk}.attn1.to_{x}"]["rank"] for x in "qkv"}) == 1
    from dirotq.fusion import fusion_stats

    assert len(fusion_stats(load_quantized(path, fuse_shared_inputs=True))) == 2


def test_generate_writes_reference_and_w4a4_side_by_side(env, capsys, monkeypatch):
    root, model, common = env
    monkeypatch.chdir(root)
    ckpt = root / "ckpt" / "dirotq-w4a4-g64-r16-tiny-pixart"
    args = ["generate", *common, "--prompt", PROMPTS[0], "--seed", "3", "--out", str(root / "gen")]
    if ckpt.is_dir():
        args += ["--checkpoint", str(ckpt)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "backend:" in out and "PSNR" in out
    names = sorted(p.name for p in (root / "gen").iterdir())
    assert len(names) == 4 and any(n.endswith("_side_by_side.png") for n in names)
    info = json.loads(next((root / "gen").glob("*.json")).read_text())
    assert info["backend"] and info["psnr_db"] > 0 and info["seed"] == 3


def test_calibrate_evaluate_and_report(env, capsys, monkeypatch):
    root, model, common = env
    monkeypatch.chdir(root)
    assert main(["calibrate", "--model", str(model), "--steps", "2", "--prompts", str(root / "calib.txt"),
                 "--out", str(root / "calib")]) == 0
    assert "statistics:" in capsys.readouterr().out
    assert main(["evaluate", *common, "--prompts", str(root / "eval.txt"), "--methods", "rtn,dirotq", "--rank", "8",
                 "--seeds", "1", "--no-judge", "--n-boot", "100", "--out", str(root / "ev")]) == 0
    out = capsys.readouterr().out
    assert "dirotq" in out and "noise" in out
    assert (root / "ev" / "quality.md").is_file() and (root / "ev" / "quality_contact.png").is_file()
    # --scale-format reaches every evaluated method's config
    assert main(["evaluate", *common, "--prompts", str(root / "eval.txt"), "--methods", "dirotq-lr", "--rank", "8",
                 "--seeds", "1", "--no-judge", "--n-boot", "100", "--scale-format", "int_ratio",
                 "--out", str(root / "evc")]) == 0
    capsys.readouterr()
    res = json.loads((root / "evc" / "quality.json").read_text())
    assert res["methods"]["dirotq-lr"]["config"]["scale_format"] == "int_ratio"
    plan = root / "plan.json"
    plan.write_text(json.dumps({"_default": 8, "transformer_blocks.0.attn1.to_q": 32}))
    assert main(["report", *common, "--methods", "rtn,dirotq", "--rank-plan", str(plan), "--format", "csv",
                 "--cache", str(root / "ev"), "--out", str(root / "layers.csv")]) == 0
    rows = (root / "layers.csv").read_text().splitlines()
    assert rows[0].startswith("method,rank,layer") and len(rows) == 1 + 2 * 16
    # the same table in format C: other errors, same layers
    assert main(["report", *common, "--methods", "rtn,dirotq", "--rank-plan", str(plan), "--format", "csv",
                 "--scale-format", "int_ratio", "--cache", str(root / "ev"), "--out", str(root / "layers_c.csv")]) == 0
    rows_c = (root / "layers_c.csv").read_text().splitlines()
    assert len(rows_c) == len(rows) and rows_c != rows
    assert [r.split(",")[:3] for r in rows_c] == [r.split(",")[:3] for r in rows]


def test_quantize_weight_only_ranks(env, capsys, monkeypatch):
    """By default (PCA methods, output allocation) the allocator may give the weight-only ff.net.2 a
    16-bit branch within the fixed plan's budget; --no-weight-only-ranks plans the W4A4 layers only;
    an explicit --weight-only-ranks without a branch method or an allocation is refused before any work."""
    root, _, common = env
    monkeypatch.chdir(root)
    assert main(["quantize", *common, "--method", "dirotq-lr", "--rank", "16", "--out", str(root / "wo")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("ranks by model-output sensitivity"))
    assert "weight-only layers given a 16-bit branch" in line
    (path,) = (root / "wo").iterdir()
    targets = json.loads((path / "config.json").read_text())["quantization_config"]["targets"]
    wo = {n: t for n, t in targets.items() if t["kind"] == "w4a16"}
    assert wo and all(t["act_bits"] is None for t in wo.values())
    assert all(t["method"] == ("dirotq-lr" if t["rank"] else "w4a16") for t in wo.values()), wo
    assert main(["quantize", *common, "--method", "dirotq-lr", "--rank", "16", "--no-weight-only-ranks",
                 "--out", str(root / "w4a4only")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("ranks by model-output sensitivity"))
    assert "weight-only" not in line
    (path,) = (root / "w4a4only").iterdir()
    targets = json.loads((path / "config.json").read_text())["quantization_config"]["targets"]
    assert all(t["method"] == "w4a16" and not t["rank"] for t in targets.values() if t["kind"] == "w4a16")
    for bad, message in ((["--method", "svdquant"], "needs a PCA method"), (["--allocate", "fixed"], "needs --allocate")):
        assert main(["quantize", *common, "--rank", "16", "--weight-only-ranks", *bad, "--out", str(root / "x")]) == 2
        assert message in capsys.readouterr().err
    assert not (root / "x").exists()


def test_quantize_eigensolver_top_reaches_the_linear_algebra(env, capsys, monkeypatch):
    """``--eigensolver top`` (FLUX-size models): the top-r solver builds the PCA bases, and on the
    tiny model's narrow layers it gives the checkpoint eigh gives."""
    from dirotq.methods import common

    root, model, common_args = env
    monkeypatch.chdir(root)
    calls = []
    real = common.pca_top_basis
    monkeypatch.setattr(common, "pca_top_basis", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    args = [*common_args, "--rank", "16", "--allocate", "fixed"]
    assert main(["quantize", *args, "--out", str(root / "eigh")]) == 0
    assert not calls
    assert main(["quantize", *args, "--eigensolver", "top", "--out", str(root / "top")]) == 0
    assert calls and set(calls) == {16}
    name = "dirotq-lr-w4a4-g64-r16-tiny-pixart"
    a = json.loads((root / "eigh" / name / "config.json").read_text())["quantization_config"]
    b = json.loads((root / "top" / name / "config.json").read_text())["quantization_config"]
    assert a == b  # d ≤ 512: the solver decomposes fully, the same bits
    with pytest.raises(SystemExit):
        main(["quantize", *args, "--eigensolver", "lanczos"])
    capsys.readouterr()


def test_layer_kind_quantizes_pixarts_cross_attention_kv_through_every_verb(env, capsys, monkeypatch):
    """--layer-kind makes PixArt's cross-attention K/V (16-bit by default) W4A4: the dry run counts them,
    quantize calibrates and quantizes them and names the checkpoint after the override, generate uses
    them, and ff.net.2 can be kept 16-bit the same way."""
    root, model, common = env
    monkeypatch.chdir(root)
    kinds = ["--layer-kind", "attn2.to_k=w4a4", "--layer-kind", "attn2.to_v=w4a4", "--layer-kind", "ff.net.2=16bit"]
    assert main(["quantize", "--model", str(model), "--dry-run", *kinds, "--out", str(root / "kinds")]) == 0
    out = capsys.readouterr().out
    assert "18 W4A4 targets, 0 W4A16" in out  # 14 + 2 blocks × (to_k, to_v); ff.net.2 kept
    assert main(["quantize", *common, "--method", "dirotq-lr", "--rank", "16", "--allocate", "fixed", *kinds,
                 "--out", str(root / "kinds")]) == 0
    path = root / "kinds" / "dirotq-lr-w4a4-g64-r16-tiny-pixart-attn2.to_k=w4a4-attn2.to_v=w4a4-ff.net.2=16bit"
    from dirotq.checkpoint import load_quantized
    from dirotq.modules import QuantLinear

    q = load_quantized(path)
    block = q.transformer_blocks[0]
    assert isinstance(block.attn2.to_k, QuantLinear) and block.attn2.to_k.act_bits == 4
    assert not isinstance(block.ff.net[2], QuantLinear)
    capsys.readouterr()
    assert main(["generate", *common, "--method", "dirotq-lr", "--rank", "16", *kinds[:4], "--prompt", PROMPTS[0],
                 "--out", str(root / "gen_kinds")]) == 0
    backend = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("backend:"))
    # 14 default W4A4 targets + 4 cross-attention K/V, of which q/k/v (6) and the K/V (4) run as 4 fused layers
    assert "12× W4A4" in backend and "(4 of them fused from 10 layers that share an input)" in backend


def test_layer_kind_conditioning_quantizes_the_linears_outside_the_blocks(env, capsys, monkeypatch):
    """--layer-kind conditioning=w8a16: PixArt's timestep embedder, adaLN-single and caption projection
    (16-bit by default) become weight-only targets with 8-bit weights, are quantized, and load back as
    such; one of them can still be set apart by name (here 4-bit weights)."""
    root, model, common = env
    monkeypatch.chdir(root)
    kinds = ["--layer-kind", "conditioning=w8a16", "--layer-kind", "caption_projection.linear_2=w4a16"]
    assert main(["quantize", "--model", str(model), "--dry-run", *kinds, "--out", str(root / "cond")]) == 0
    assert "14 W4A4 targets, 3 W4A16, 4 W8A16" in capsys.readouterr().out  # 2 ff.net.2 + 1; 4 conditioning
    assert main(["quantize", *common, "--rank", "16", "--allocate", "fixed", *kinds, "--out", str(root / "cond")]) == 0
    assert "(14 W4A4, 3 W4A16, 4 W8A16)" in capsys.readouterr().out
    from dirotq.checkpoint import load_quantized
    from dirotq.modules import QuantLinear

    (path,) = (root / "cond").iterdir()
    assert path.name.endswith("-caption_projection.linear_2=w4a16-conditioning=w8a16")
    q = load_quantized(path)
    for name in ("adaln_single.linear", "adaln_single.emb.timestep_embedder.linear_1", "caption_projection.linear_1"):
        layer = q.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.act_bits is None and layer.weight_bits == 8, name
    layer = q.get_submodule("caption_projection.linear_2")
    assert isinstance(layer, QuantLinear) and layer.weight_bits == 4
    assert not isinstance(q.get_submodule("proj_out"), QuantLinear)
    # a rank plan that names a weight-only layer gives it a 16-bit branch: a PCA method's, not RTN's
    plan = root / "cond-plan.json"
    plan.write_text(json.dumps({"_default": 8, "adaln_single.linear": 8}))
    assert main(["quantize", "--model", str(model), "--dry-run", *kinds, "--rank-plan", str(plan)]) == 0
    assert "16-bit branches of weight-only targets: {'adaln_single.linear': 8}" in capsys.readouterr().out
    assert main(["quantize", "--model", str(model), "--dry-run", *kinds, "--method", "svdquant",
                 "--rank-plan", str(plan)]) == 2
    assert "needs a PCA method" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--model", "/no/such/model", "--dry-run"], "does not exist"),
    (["quantize", "--rank", "65", "--dry-run"], "exceeds"),
    (["quantize", "--rank-plan", "{plan}", "--dry-run"], "not valid JSON"),
    (["quantize", "--rank-plan", "{missing}", "--dry-run"], "not found"),
    (["quantize", "--layer-kind", "attn3.to_k=w4a4", "--dry-run"], "attn3.to_k is not a layer type of this model"),
    # the names outside the blocks an override may use are listed
    (["quantize", "--layer-kind", "adaln.linear=w4a16", "--dry-run"], "outside the blocks: proj_out"),
])
def test_bad_input_is_one_line_and_exit_2(env, capsys, argv, message):
    root, model, _ = env
    (root / "bad.json").write_text("{not json")
    argv = [a.format(plan=root / "bad.json", missing=root / "nope.json") for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(model)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("dirotq quantize: error:") and "\n" not in err


def test_malformed_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--method", "magic", "--dry-run"])
    assert e.value.code == 2 and "unknown method" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--sweep-ranks", "8,x"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--layer-kind", "attn2.to_k=int8", "--dry-run"])
    assert e.value.code == 2 and "KIND one of w4a4, w4a16, w8a16, 16bit" in capsys.readouterr().err


def test_generate_cuda_graphs_refuses_what_cannot_run(capsys):
    """--cuda-graphs is for a GPU and instead of --compile: a clear error before any loading."""
    import torch

    if not torch.cuda.is_available():
        assert main(["generate", "--cuda-graphs", "--quick"]) == 2
        assert "--cuda-graphs needs a CUDA GPU" in capsys.readouterr().err
    assert main(["generate", "--cuda-graphs", "--compile", "blocks", "--device", "cuda"]) == 2
    assert "choose one" in capsys.readouterr().err


def test_missing_model_in_a_subprocess_is_one_line_no_traceback(env):
    root, _, _ = env
    repo = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "dirotq", "quantize", "--model", str(root / "missing"), "--dry-run"],
                       capture_output=True, text=True, cwd=repo, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "does not exist" in p.stderr


def test_generate_warns_on_unknown_words_and_truncation_and_never_overwrites(env, capsys, monkeypatch):
    root, model, common = env
    monkeypatch.chdir(root)
    # "zebra" is not in the tiny vocabulary; 17 words and the end token: 18 tokens, the pipeline reads 16
    prompt = "a big red circle on the left and a small blue zebra on the right of a white background"
    args = ["generate", *common, "--prompt", prompt, "--seed", "5", "--out", str(root / "gen-twice")]
    assert main(args) == 0
    first = capsys.readouterr()
    warnings = [line for line in first.err.splitlines() if line.startswith("dirotq generate: warning:")]
    assert len(warnings) == 2, first.err
    assert "does not know the words ['zebra']" in warnings[0]
    assert "prompt truncated" in warnings[1] and "reads only the first 16" in warnings[1]
    assert main(args) == 0  # the same run again: new files beside the first run's
    second = capsys.readouterr().out
    names = sorted(p.name for p in (root / "gen-twice").iterdir())
    assert len(names) == 8 and sum(n.endswith("-s5-2_side_by_side.png") for n in names) == 1
    assert "-s5-2_side_by_side.png" in second and "-s5-2" not in first.out
    info = json.loads(next((root / "gen-twice").glob("*-s5-2.json")).read_text())
    assert len(info["warnings"]) == 2


def test_generate_checks_its_numbers_before_loading_anything(capsys):
    assert main(["generate", "--model", "/no/such/model", "--seed", "-1"]) == 2
    assert "seed must be in [0, 2^63 − 1], got -1" in capsys.readouterr().err  # not "does not exist"
    assert main(["generate", "--model", "/no/such/model", "--guidance", "99"]) == 2
    assert "guidance must be in [0, 30], got 99" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--steps", "0"])
    assert e.value.code == 2 and "expected a whole number ≥ 1, got 0" in capsys.readouterr().err


def test_quick_preset_fills_only_the_calibration_flags_not_given(capsys):
    from dirotq.cli import QUICK, _apply_quick, build_parser

    def parsed(*argv):
        args = build_parser().parse_args(list(argv))
        _apply_quick(args, argv)
        return args

    a = parsed("quantize", "--quick")
    assert (a.calib_limit, a.calib_steps) == (QUICK["calib_limit"], QUICK["calib_steps"]) == (8, 4)
    a = parsed("quantize", "--quick", "--calib-limit", "16")
    assert (a.calib_limit, a.calib_steps) == (16, 4)
    a = parsed("quantize")
    assert (a.calib_limit, a.calib_steps) == (None, None)
    a = parsed("calibrate", "--quick", "--steps=10")
    assert (a.limit, a.steps) == (8, 10)
    for verb in ("calibrate", "quantize", "generate", "evaluate", "report"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "--quick" in capsys.readouterr().out


def test_long_verbs_show_bars_with_a_total_so_an_eta(env, capsys, monkeypatch):
    import re

    root, model, common = env
    monkeypatch.chdir(root)
    assert main(["calibrate", "--model", str(model), "--steps", "2", "--prompts", str(root / "calib.txt"),
                 "--out", str(root / "calib-bars")]) == 0
    err = capsys.readouterr().err
    # 3 prompts in one batch × 2 denoising steps, counted in steps (it was per mille)
    assert re.search(r"calibrating: +100%\|[^|]*\| 2/2 \[\d\d:\d\d<\d\d:\d\d", err), err
    assert main(["quantize", *common, "--method", "rtn", "--out", str(root / "ckpt-bars")]) == 0
    # the layers' bar has its total (the ETA needs a rate: on 16 tiny layers tqdm may not redraw before the end)
    assert re.search(r"quantize rtn: .*\d+/16 \[", capsys.readouterr().err)


def _copy_of_the_embedded_model(tmp_path) -> Path:
    import shutil

    from dirotq.pipelines import DEFAULT_MODEL

    if not (Path(DEFAULT_MODEL) / "model_index.json").is_file():
        pytest.skip(f"the embedded model is not built yet ({DEFAULT_MODEL})")
    model = tmp_path / "tiny-pixart"
    shutil.copytree(DEFAULT_MODEL, model)
    return model


@pytest.mark.parametrize("damage, argv", [
    ("truncate", ["calibrate", "--limit", "1", "--steps", "1"]),  # the whole pipeline (load_pipeline)
    ("flip", ["quantize", "--dry-run"]),  # the transformer alone (load_transformer)
])
def test_a_corrupt_weight_file_is_one_line_and_exit_2(tmp_path, damage, argv):
    model = _copy_of_the_embedded_model(tmp_path)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size // 2)
    else:  # one byte of the JSON header: a quote becomes garbage
        data = bytearray(weights.read_bytes())
        data[20] ^= 0xFF
        weights.write_bytes(bytes(data))
    repo = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "dirotq", *argv, "--model", str(model), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=repo, timeout=300)
    err = p.stderr.strip()
    assert p.returncode == 2 and err.count("\n") == 0, err
    assert err.startswith(f"dirotq {argv[0]}: error: cannot load the model in {model}")
    assert "diffusion_pytorch_model.safetensors is truncated or corrupted" in err


def test_ctrl_c_during_calibration_is_one_line_and_exit_130(tmp_path):
    import signal
    import threading
    import time

    from dirotq.pipelines import DEFAULT_MODEL

    if not (Path(DEFAULT_MODEL) / "model_index.json").is_file():
        pytest.skip(f"the embedded model is not built yet ({DEFAULT_MODEL})")
    repo = Path(__file__).resolve().parent.parent
    p = subprocess.Popen([sys.executable, "-m", "dirotq", "calibrate", "--out", str(tmp_path / "cal")], cwd=repo,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # pytest may ignore it
    err = bytearray()
    reader = threading.Thread(target=lambda: [err.extend(c) for c in iter(lambda: p.stderr.read1(4096), b"")],
                              daemon=True)
    reader.start()
    try:
        t0 = time.time()
        while b"calibrating: batch" not in err:  # 96 prompts × 20 steps: minutes to go
            assert p.poll() is None and time.time() - t0 < 120, err.decode()
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 130
    finally:
        if p.poll() is None:
            p.kill()
    reader.join(10)
    text = err.decode()
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    assert last == "dirotq calibrate: interrupted (Ctrl-C)", text[-500:]
    assert "Traceback" not in text and "terminate called" not in text
    assert not any((tmp_path / "cal").glob("*/meta.json"))  # no statistics from a cut-short run


@pytest.mark.parametrize("after_s", [0.2, 0.4, 0.8, 1.2, 2.0])
def test_ctrl_c_while_torch_imports_is_one_line(after_s):
    """Ctrl-C in the first seconds of `python -m dirotq`, while the package imports torch."""
    import signal
    import time

    repo = Path(__file__).resolve().parent.parent
    p = subprocess.Popen([sys.executable, "-m", "dirotq", "quantize", "--dry-run"], cwd=repo,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(after_s)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    text = err.decode()
    assert p.returncode == 130, text[-800:]
    # while the package imports: "dirotq: …"; once the verb runs: "dirotq quantize: …"
    assert text.strip() in ("dirotq: interrupted (Ctrl-C)", "dirotq quantize: interrupted (Ctrl-C)"), text[-800:]


def test_calibrate_fills_the_cache_the_other_verbs_read(env, capsys, monkeypatch):
    """`calibrate` then `quantize` with the same prompts and steps: the second reads the first's
    statistics (the calibrate verb's cache was out/calibration, nobody else's: it calibrated twice)."""
    root, model, common = env
    work = root / "shared-cache"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["calibrate", "--model", str(model), "--steps", "2", "--prompts", str(root / "calib.txt")]) == 0
    capsys.readouterr()

    def no_second_calibration(*a, **k):
        raise AssertionError("quantize calibrated again")

    monkeypatch.setattr("dirotq.calibration._Recorder", no_second_calibration)
    assert main(["quantize", *common, "--method", "dirotq", "--rank", "8", "--out", str(work / "ckpt")]) == 0


def test_generate_compiled_draws_the_eager_images_and_reports_the_compilation(env, capsys, monkeypatch):
    """``generate --compile blocks``: both transformers compiled block by block without a graph break,
    images equal to the eager ones up to inductor's rounding (and the flipped 4-bit codes it causes)."""
    from torch._inductor import config as inductor_config

    from dirotq.eval.metrics import psnr

    root, model, common = env
    monkeypatch.chdir(root)
    monkeypatch.setattr(inductor_config, "compile_threads", 1)  # no pool of compile workers left running
    ckpt = root / "ckpt" / "dirotq-w4a4-g64-r16-tiny-pixart"
    if not ckpt.is_dir():
        pytest.skip("needs the checkpoint written by test_quantize_writes_a_checkpoint_named_by_the_recipe")
    base = ["generate", *common, "--prompt", PROMPTS[0], "--seed", "4", "--checkpoint", str(ckpt)]
    assert main([*base, "--out", str(root / "gen-eager")]) == 0
    assert main([*base, "--compile", "blocks", "--out", str(root / "gen-compiled")]) == 0
    out = capsys.readouterr().out
    assert "compiled quantized:" in out and "0 graph breaks" in out
    info = json.loads(next((root / "gen-compiled").glob("*.json")).read_text())
    assert info["compile"]["scope"] == "blocks"
    for side in ("reference", "quantized"):
        assert info["compile"][side]["graphs"] >= 1 and info["compile"][side]["graph_breaks"] == 0
    from PIL import Image

    for suffix, floor in (("_reference.png", 40.0), ("_w4a4.png", 25.0)):
        eager = Image.open(next((root / "gen-eager").glob(f"*{suffix}")))
        compiled = Image.open(next((root / "gen-compiled").glob(f"*{suffix}")))
        assert psnr(eager, compiled) > floor, suffix


def test_compile_pair_fails_loudly_at_the_recompile_limit(monkeypatch):
    """Blocks whose layers differ in shape recompile; past dynamo's limit it would run them eagerly
    without a word, so compile_pair raises instead (and names the way out)."""
    import torch._dynamo

    from dirotq.compiling import compile_transformer, uncompile
    from dirotq.generate import compile_pair
    from tests.tiny_pipelines import build_tiny_pixart_pipeline

    pipe = build_tiny_pixart_pipeline(seed=0)
    with pytest.raises(ValueError, match="compile scope 'layers'"):
        compile_transformer(pipe.transformer, "layers")
    with pytest.raises(ValueError, match="compile mode 'fast'"):
        compile_transformer(pipe.transformer, "blocks", "fast")
    # the first block's attention a different width than the second's: two shapes, limit one
    blocks = list(pipe.transformer.transformer_blocks)
    torch.manual_seed(0)
    blocks[1].attn1.to_q = torch.nn.Linear(blocks[1].attn1.to_q.in_features, blocks[1].attn1.to_q.out_features,
                                           bias=False)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    torch._dynamo.reset()
    try:
        with pytest.raises(RuntimeError, match="recompile_limit"):
            compile_pair(pipe, pipe.transformer, PROMPTS[0], 0, guidance_scale=4.5, backend="eager")
    finally:
        uncompile(blocks)
        torch._dynamo.reset()
