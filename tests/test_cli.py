"""The command line (dirotq/cli.py): every verb on the tiny random PixArt-Σ pipeline saved to a
folder, and bad input answered with one line and exit status 2 (no traceback)."""

import json
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
    assert "dirotq-w4a4-g64-r32-tiny-pixart" in out
    assert not (root / "out").exists()  # a dry run writes nothing


def test_quantize_writes_a_checkpoint_named_by_the_recipe(env, capsys, monkeypatch):
    root, model, common = env
    monkeypatch.chdir(root)
    assert main(["quantize", *common, "--method", "dirotq", "--rank", "16", "--out", str(root / "ckpt")]) == 0
    path = root / "ckpt" / "dirotq-w4a4-g64-r16-tiny-pixart"
    assert (path / "config.json").is_file()
    assert "quantization_config" in json.loads((path / "config.json").read_text())
    assert f"checkpoint: {path}" in capsys.readouterr().out


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
    plan = root / "plan.json"
    plan.write_text(json.dumps({"_default": 8, "transformer_blocks.0.attn1.to_q": 32}))
    assert main(["report", *common, "--methods", "rtn,dirotq", "--rank-plan", str(plan), "--format", "csv",
                 "--cache", str(root / "ev"), "--out", str(root / "layers.csv")]) == 0
    rows = (root / "layers.csv").read_text().splitlines()
    assert rows[0].startswith("method,rank,layer") and len(rows) == 1 + 2 * 16


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--model", "/no/such/model", "--dry-run"], "does not exist"),
    (["quantize", "--rank", "65", "--dry-run"], "exceeds"),
    (["quantize", "--rank-plan", "{plan}", "--dry-run"], "not valid JSON"),
    (["quantize", "--rank-plan", "{missing}", "--dry-run"], "not found"),
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


def test_missing_model_in_a_subprocess_is_one_line_no_traceback(env):
    root, _, _ = env
    repo = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "dirotq", "quantize", "--model", str(root / "missing"), "--dry-run"],
                       capture_output=True, text=True, cwd=repo, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "does not exist" in p.stderr
