"""Claims about diffusers-native loading (dirotq/diffusers_integration.py): once ``dirotq`` is
imported, ``ModelClass.from_pretrained(folder)`` (and a pipeline whose transformer folder is a dirotq
checkpoint) loads what ``save_quantized`` wrote, one file or sharded, bit-identical to
``load_quantized``: a fresh process generates the same image bit for bit. Float checkpoints are
untouched by the registration, and damage is a clear error on this path too."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dirotq import DiRotQLRConfig, QuantLinear, RTNConfig, load_quantized, quantize_, save_quantized
from dirotq.checkpoint import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME

from conftest import calibrated_tiny

ROOT = Path(__file__).resolve().parents[1]
FORMAT1 = ROOT / "tests" / "data" / "format1-dirotq-lr-tiny-pixart"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# One generation, run here and in a fresh process: the same code, one thread, a fixed seed.
GENERATE = '''
import numpy as np
import torch


def generate(pipe):
    """(latents, image) of one prompt, 2 steps, seed 0: float32 numpy arrays."""
    from dirotq.pipelines import call_kwargs

    kw = call_kwargs(pipe, {"num_inference_steps": 2, "guidance_scale": 4.5})
    latents = pipe("a red circle on the left", generator=torch.Generator().manual_seed(0), output_type="latent",
                   **kw).images
    image = pipe("a red circle on the left", generator=torch.Generator().manual_seed(0), output_type="np",
                 **kw).images
    return latents.float().numpy(), np.asarray(image, dtype=np.float32)
'''

FRESH = GENERATE + '''
import sys

torch.set_num_threads(1)
import dirotq  # registers the dirotq quantizer with diffusers; nothing else is needed
from diffusers import PixArtSigmaPipeline

pipe = PixArtSigmaPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
quantized = sum(type(m).__name__ == "QuantLinear" for m in pipe.transformer.modules())
latents, image = generate(pipe)
np.savez(sys.argv[2], latents=latents, image=image, quantized=quantized,
         hash_checked=getattr(pipe.transformer, "_dirotq_quantization", None) is not None)
'''


def generate(pipe):
    scope: dict = {}
    exec(GENERATE, scope)  # noqa: S102 - the same source the fresh process runs
    return scope["generate"](pipe)


@pytest.fixture(scope="module")
def tiny():
    return calibrated_tiny(batches=2, sample_tokens=64)


@pytest.fixture(scope="module")
def pipeline_folder(tiny, tmp_path_factory):
    """A saved tiny PixArt-Σ pipeline whose transformer folder is a dirotq-lr checkpoint."""
    from tiny_pipelines import build_tiny_pixart_pipeline

    stats = tiny[2]
    root = tmp_path_factory.mktemp("pipe") / "tiny-pixart-dirotq"
    pipe = build_tiny_pixart_pipeline(seed=0)  # its transformer is adapter.build_tiny(0), as the stats' model
    pipe.save_pretrained(root)
    quantize_(pipe.transformer, DiRotQLRConfig(rank=16), stats, progress=lambda *a: None)
    shutil.rmtree(root / "transformer")
    save_quantized(pipe.transformer, root / "transformer")
    return root


@pytest.fixture(scope="module")
def checkpoint(pipeline_folder):
    return pipeline_folder / "transformer"


def pixart():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_fresh_process_from_pretrained_generates_the_same_image_as_load_quantized(pipeline_folder, tmp_path):
    from diffusers import PixArtSigmaPipeline

    out = tmp_path / "fresh.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", FRESH, str(pipeline_folder), str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    fresh = np.load(out)
    pipe = PixArtSigmaPipeline.from_pretrained(pipeline_folder, transformer=load_quantized(
        pipeline_folder / "transformer"))
    pipe.set_progress_bar_config(disable=True)
    latents, image = generate(pipe)
    n_quant = sum(isinstance(m, QuantLinear) for m in pipe.transformer.modules())
    assert int(fresh["quantized"]) == n_quant > 0 and bool(fresh["hash_checked"])
    assert fresh["latents"].dtype == latents.dtype and np.array_equal(fresh["latents"], latents)
    assert np.array_equal(fresh["image"], image)
    assert np.isfinite(image).all() and image.std() > 0  # a real image, not a constant


def test_import_dirotq_stays_light_and_registers_on_diffusers_import():
    code = ("import sys, dirotq; assert 'diffusers' not in sys.modules and 'peft' not in sys.modules;"
            "from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q, AUTO_QUANTIZATION_CONFIG_MAPPING as C;"
            "assert 'dirotq' in Q and 'dirotq' in C; print('ok')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_from_pretrained_matches_load_quantized_one_file_sharded_and_format1(tiny, checkpoint, tmp_path):
    sharded = save_quantized(load_quantized(checkpoint), tmp_path / "sharded", max_shard_size="30KB")
    assert (sharded / INDEX_NAME).is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    test = tiny[3]
    reference = load_quantized(checkpoint)
    with torch.no_grad():
        y = reference(**test).sample
    for folder in (checkpoint, sharded):
        model = pixart().from_pretrained(folder)
        assert isinstance(model.get_submodule("transformer_blocks.0.attn1.to_q"), QuantLinear)
        assert_same_model(reference, model)
        assert model._dirotq_quantization == reference._dirotq_quantization
        with torch.no_grad():
            assert torch.equal(model(**test).sample, y)
    assert_same_model(load_quantized(FORMAT1), pixart().from_pretrained(FORMAT1))


@pytest.mark.parametrize("family", ["flux", "sd3", "sana", "dit"])
def test_from_pretrained_is_generic_over_model_classes(family, tmp_path):
    from dirotq.models import ADAPTERS

    adapter = ADAPTERS[family]
    model = adapter.build_tiny(0)
    quantize_(model, RTNConfig(), progress=lambda *a: None)
    save_quantized(model, tmp_path / family, max_shard_size="40KB")
    loaded = type(model).from_pretrained(tmp_path / family)
    assert_same_model(load_quantized(tmp_path / family), loaded)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == len(model._dirotq_quantization["targets"])
    example = adapter.example_inputs(model, 1, torch.Generator().manual_seed(0))
    with torch.no_grad():  # models loaded from disk agree bit for bit (see docs/DESIGN.md §8 on the saved one)
        assert torch.equal(load_quantized(tmp_path / family)(**example).sample, loaded(**example).sample)
        torch.testing.assert_close(model(**example).sample, loaded(**example).sample, rtol=1e-5, atol=1e-5)


def test_from_pretrained_model_saves_back_to_the_same_content(checkpoint, tmp_path):
    model = pixart().from_pretrained(checkpoint)
    again = save_quantized(model, tmp_path / "again")
    def block(folder):
        return json.loads((folder / CONFIG_NAME).read_text())["quantization_config"]

    assert block(again)["content_hash"] == block(checkpoint)["content_hash"]
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, DiRotQLRConfig(rank=16), progress=lambda *a: None)


def test_torch_dtype_and_device_map(checkpoint, tmp_path):
    bf16 = pixart().from_pretrained(checkpoint, torch_dtype=torch.bfloat16)
    assert_same_model(load_quantized(checkpoint, dtype=torch.bfloat16), bf16)
    q = bf16.get_submodule("transformer_blocks.0.attn1.to_q")
    assert q.weight_scale.dtype == torch.float16 and q.weight_packed.dtype == torch.uint8
    assert q.up.dtype == torch.bfloat16
    reference = load_quantized(checkpoint)
    for device_map in ("cpu", {"": "cpu"}, "auto"):
        assert_same_model(reference, pixart().from_pretrained(checkpoint, device_map=device_map))
    with pytest.raises(ValueError, match="cannot be offloaded to disk"):
        pixart().from_pretrained(checkpoint, device_map={"": "disk"}, offload_folder=str(tmp_path / "off"))


def test_float_checkpoint_is_unaffected_by_the_registration(tiny, tmp_path):
    model = tiny[1]
    model.save_pretrained(tmp_path / "float")
    loaded = pixart().from_pretrained(tmp_path / "float")
    assert getattr(loaded, "hf_quantizer", None) is None and not hasattr(loaded, "_dirotq_quantization")
    assert not any(isinstance(m, QuantLinear) for m in loaded.modules())
    assert_same_model(model, loaded)


def damaged(folder, tmp_path):
    dst = tmp_path / "damaged"
    shutil.copytree(folder, dst)
    return dst


def test_missing_shard_tampered_tensor_and_wrong_keys_are_clear_errors(checkpoint, tmp_path):
    sharded = save_quantized(load_quantized(checkpoint), tmp_path / "sharded", max_shard_size="30KB")
    p = damaged(sharded, tmp_path)
    victim = sorted(p.glob("diffusion_pytorch_model-*.safetensors"))[2]
    tensors = load_file(str(victim))
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[-1] += 1
    save_file(tensors, str(victim))
    with pytest.raises(ValueError, match="corrupt or modified checkpoint"):
        pixart().from_pretrained(p)
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        pixart().from_pretrained(p)

    p2 = damaged(checkpoint, tmp_path / "2")
    tensors = load_file(str(p2 / WEIGHTS_NAME))
    key = "transformer_blocks.1.attn1.to_v.up"
    save_file({k: v for k, v in tensors.items() if k != key}, str(p2 / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        pixart().from_pretrained(p2)
    cfg = json.loads((p2 / CONFIG_NAME).read_text())
    cfg["quantization_config"]["format_version"] = 99
    (p2 / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="newer than this dirotq"):
        pixart().from_pretrained(p2)
