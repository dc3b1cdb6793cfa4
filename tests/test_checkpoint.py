"""Claims about quantized checkpoints (docs/DESIGN.md §8): safetensors + config.json with
a ``quantization_config`` block; loading is bit-exact for every method, and every kind of damage is
a clear error."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dirotq import (DiRotQConfig, DiRotQLRConfig, QuantLinear, QuaRotConfig, RTNConfig, SmoothQuantConfig,
                    SVDQuantConfig, W4A16Config, __version__, load_quantized, quantize_, save_quantized)
from dirotq.checkpoint import CONFIG_NAME, WEIGHTS_NAME, recipe_name

from conftest import calibrated_tiny

CONFIGS = {
    "rtn": RTNConfig(), "w4a16": W4A16Config(), "smoothquant": SmoothQuantConfig(), "quarot": QuaRotConfig(),
    "quarot-block": QuaRotConfig(hadamard="block"), "svdquant": SVDQuantConfig(rank=16),
    "dirotq": DiRotQConfig(rank=16), "dirotq-original": DiRotQConfig(rank=16, weight_basis="original"),
    "dirotq-paper-gptq": DiRotQConfig.paper(), "dirotq-w8-int_ratio": DiRotQConfig(rank=16, weight_bits=8,
                                                                                    scale_format="int_ratio"),
    "dirotq-w16": DiRotQConfig(rank=16, weight_bits=16), "dirotq-lr": DiRotQLRConfig(rank=16),
    "dirotq-lr-hsvd": DiRotQLRConfig(rank=16, basis="hsvd"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    return calibrated_tiny(batches=2, sample_tokens=64)


def quantized(tiny, config):
    _, model, stats, _ = tiny
    m = copy.deepcopy(model)
    quantize_(m, config, stats, progress=lambda *a: None)
    return m


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """A saved DiRotQ checkpoint folder (copied per damage test)."""
    path = tmp_path_factory.mktemp("ckpt") / "dirotq"
    save_quantized(quantized(tiny, DiRotQConfig(rank=16)), path)
    return path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_bit_exact(tiny, tmp_path, name):
    _, _, _, test = tiny
    m = quantized(tiny, CONFIGS[name])
    save_quantized(m, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert type(loaded) is type(m)
    a, b = m.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for n, mod in m.named_modules():
        if isinstance(mod, QuantLinear):
            other = loaded.get_submodule(n)
            assert isinstance(other, QuantLinear) and other.meta == mod.meta and other.rank == mod.rank
            assert (other.act_bits, other.act_symmetric, other.scale_format, other.project_out,
                    other.weights_in_original_basis) == (mod.act_bits, mod.act_symmetric, mod.scale_format,
                                                         mod.project_out, mod.weights_in_original_basis)
    with torch.no_grad():
        assert torch.equal(m(**test).sample, loaded(**test).sample)


def test_config_json_carries_the_quantization_block(tiny, saved):
    cfg = json.loads((saved / CONFIG_NAME).read_text())
    assert cfg["_class_name"] == "PixArtTransformer2DModel" and cfg["num_layers"] == 2
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "dirotq" and qc["dirotq_version"] == __version__
    assert qc["torch_version"] and qc["diffusers_version"] and qc["group_size"] == 64
    assert qc["config"]["method"] == "dirotq" and qc["config"]["rank"] == {"_default": 16}
    assert qc["content_hash"].startswith("sha256:") and len(qc["content_hash"]) == 7 + 64
    adapter, model, _, _ = tiny
    assert set(qc["targets"]) == set(adapter.targets(model))
    t = qc["targets"]["transformer_blocks.0.attn1.to_q"]
    assert (t["method"], t["rank"], t["kind"], t["weight_bits"], t["act_bits"]) == ("dirotq", 16, "w4a4", 4, 4)
    assert t["buffers"]["rotation"]["shape"] == [64, 48] and t["buffers"]["weight_packed"]["shape"] == [64, 32]
    assert qc["targets"]["transformer_blocks.0.ff.net.2"]["kind"] == "w4a16"
    assert set(load_file(str(saved / WEIGHTS_NAME))) == set(quantized(tiny, DiRotQConfig(rank=16)).state_dict())


def test_checkpoint_files_get_the_users_file_mode(tiny, tmp_path):
    """safetensors writes 0600 whatever the umask: a checkpoint nobody else could read."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = save_quantized(quantized(tiny, RTNConfig()), tmp_path / "q")
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert modes == {WEIGHTS_NAME: 0o644, CONFIG_NAME: 0o644}


def test_recipe_name():
    assert recipe_name(DiRotQConfig(rank=64), "tiny-pixart") == "dirotq-w4a4-g64-r64-tiny-pixart"
    assert recipe_name(RTNConfig(), "my model/v2") == "rtn-w4a4-g64-my-model-v2"


def test_unquantized_model_cannot_be_saved(tiny, tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(copy.deepcopy(tiny[1]), tmp_path / "x")


def damaged(saved, tmp_path):
    import shutil

    dst = tmp_path / "damaged"
    shutil.copytree(saved, dst)
    return dst


def test_flipped_weight_bytes_fail_the_content_hash(saved, tmp_path):
    p = damaged(saved, tmp_path)
    data = bytearray((p / WEIGHTS_NAME).read_bytes())
    data[-100] ^= 0xFF  # inside the tensor data, the header still parses
    (p / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or modified checkpoint"):
        load_quantized(p)


def test_flipped_header_bytes_and_truncation_are_corrupt_errors(saved, tmp_path):
    p = damaged(saved, tmp_path)
    data = (p / WEIGHTS_NAME).read_bytes()
    (p / WEIGHTS_NAME).write_bytes(data[:8] + b"\xff\xfe" + data[10:])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_quantized(p)
    (p / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_quantized(p)


def test_missing_or_extra_key_is_named(saved, tmp_path):
    p = damaged(saved, tmp_path)
    tensors = load_file(str(saved / WEIGHTS_NAME))
    key = "transformer_blocks.1.attn1.to_v.rotation"
    save_file({k: v for k, v in tensors.items() if k != key}, str(p / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        load_quantized(p)
    save_file({**tensors, "transformer_blocks.0.attn1.to_q.sneaky": torch.zeros(3)}, str(p / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="unexpected key 'transformer_blocks.0.attn1.to_q.sneaky'"):
        load_quantized(p)


def test_modified_tensor_with_consistent_file_fails_the_hash(saved, tmp_path):
    p = damaged(saved, tmp_path)
    tensors = load_file(str(saved / WEIGHTS_NAME))
    tensors["transformer_blocks.0.attn1.to_q.up"] = tensors["transformer_blocks.0.attn1.to_q.up"] * 1.01
    save_file(tensors, str(p / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="corrupt or modified checkpoint"):
        load_quantized(p)


def test_missing_paths_and_files_are_clear_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        load_quantized(tmp_path / "nowhere")
    p = damaged(saved, tmp_path)
    (p / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_quantized(p)
    p2 = tmp_path / "float"
    p2.mkdir()
    (p2 / CONFIG_NAME).write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    (p2 / WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(ValueError, match="no dirotq quantization_config"):
        load_quantized(p2)
    (p2 / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_quantized(p2)


def test_loaded_checkpoint_keeps_a_recorded_quantization(saved, tiny):
    m = load_quantized(saved)
    assert m._dirotq_quantization["config"]["method"] == "dirotq"
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(m, RTNConfig(), progress=lambda *a: None)


def test_bf16_model_round_trip_is_bit_exact_and_dtype_cast(tiny, tmp_path):
    adapter, model, stats, test = tiny
    m = copy.deepcopy(model).to(torch.bfloat16)
    quantize_(m, DiRotQLRConfig(rank=16), stats, progress=lambda *a: None)
    save_quantized(m, tmp_path / "bf16")
    loaded = load_quantized(tmp_path / "bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    kw = {k: v.to(torch.bfloat16) if k in ("hidden_states", "encoder_hidden_states") else v for k, v in test.items()}
    with torch.no_grad():
        assert torch.equal(m(**kw).sample, loaded(**kw).sample)  # non-persistent buffers follow the dtype too
    f32 = load_quantized(tmp_path / "bf16", dtype=torch.float32)
    q = f32.get_submodule("transformer_blocks.0.attn1.to_q")
    assert {p.dtype for p in f32.parameters()} == {torch.float32} and q.weight_scale.dtype == torch.float16
    assert q.weight_packed.dtype == torch.uint8 and q.down.dtype == torch.float32
