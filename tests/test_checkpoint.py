"""Claims about quantized checkpoints (docs/DESIGN.md §8): safetensors + config.json with
a ``quantization_config`` block; loading is bit-exact for every method, and every kind of damage is
a clear error. Sharded checkpoints (diffusers' layout) and checkpoints written in parts (distributed
quantization) load exactly like one file and carry the same content hash; format-1 checkpoints
(tests/data/format1-dirotq-lr-tiny-pixart, written by the format-1 code) still load."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dirotq import (DiRotQConfig, DiRotQLRConfig, QuantLinear, QuaRotConfig, RTNConfig, SmoothQuantConfig,
                    SVDQuantConfig, W4A16Config, __version__, load_quantized, quantize_, save_quantized)
from dirotq.checkpoint import (CONFIG_NAME, FORMAT_VERSION, INDEX_NAME, WEIGHTS_NAME, finalize_checkpoint, parse_size,
                               recipe_name, save_quantized_part)

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


# --- sharded checkpoints, parts, format 1 -----------------------------------------------------------------
FORMAT1 = Path(__file__).parent / "data" / "format1-dirotq-lr-tiny-pixart"


def quant_block(folder):
    return json.loads((Path(folder) / CONFIG_NAME).read_text())["quantization_config"]


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def lr_model(tiny):
    return quantized(tiny, DiRotQLRConfig(rank=16))


def test_parse_size_reads_diffusers_and_binary_units():
    assert parse_size(123) == 123 and parse_size("5GB") == 5 * 10**9 and parse_size("1.5 mb") == 1_500_000
    assert parse_size("40GiB") == 40 * 2**30 and parse_size("2 kib") == 2048 and parse_size("4096") == 4096
    for bad in ("5 parsecs", "-1GB", 0, "GB", True, "", "0.5"):
        with pytest.raises(ValueError, match="a size must be"):
            parse_size(bad)


def test_sharded_checkpoint_is_diffusers_layout_and_loads_bit_exact(tiny, lr_model, tmp_path):
    one = save_quantized(lr_model, tmp_path / "one")
    sharded = save_quantized(lr_model, tmp_path / "sharded", max_shard_size="30KB")
    files = sorted(f.name for f in sharded.glob("*.safetensors"))
    n = len(files)
    assert n > 2 and files == [f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(f.name for f in one.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # fits: today's layout
    index = json.loads((sharded / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(lr_model.state_dict()) and set(index["weight_map"].values()) == set(files)
    for f in files:  # a file exceeds the limit only when it holds one tensor bigger than the limit
        held = load_file(str(sharded / f))
        assert os.path.getsize(sharded / f) < 30_000 + 4096 or len(held) == 1, f
    assert quant_block(one)["content_hash"] == quant_block(sharded)["content_hash"]  # the split does not matter
    assert quant_block(sharded)["format_version"] == FORMAT_VERSION == 2
    loaded = load_quantized(sharded)
    assert_same_model(lr_model, loaded)
    with torch.no_grad():
        assert torch.equal(lr_model(**tiny[3]).sample, loaded(**tiny[3]).sample)


def test_resaving_into_a_folder_leaves_no_stale_shards(lr_model, tmp_path):
    save_quantized(lr_model, tmp_path / "q", max_shard_size="30KB")
    save_quantized(lr_model, tmp_path / "q")
    assert sorted(f.name for f in (tmp_path / "q").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    save_quantized(lr_model, tmp_path / "q", max_shard_size="60KB")
    assert WEIGHTS_NAME not in {f.name for f in (tmp_path / "q").iterdir()}
    assert_same_model(lr_model, load_quantized(tmp_path / "q"))


def two_parts(tiny, config, folder, **kw):
    """Quantize two copies of the tiny model with half the targets each and save them as parts 0 and 1,
    as two processes of a distributed run would; returns (manifests, one part's model)."""
    adapter, model, stats, _ = tiny
    names = list(adapter.targets(model))
    halves = names[: len(names) // 2], names[len(names) // 2:]
    models = [copy.deepcopy(model) for _ in halves]
    for m, half in zip(models, halves):
        quantize_(m, config, stats, targets=half, progress=lambda *a: None)
        assert set(m._dirotq_quantization["targets"]) == set(half)
    m0 = save_quantized_part(models[0], folder, include_rest=True, part=0, parts=2, quantized_elsewhere=halves[1], **kw)
    m1 = save_quantized_part(models[1], folder, part=1, parts=2, **kw)
    return [m0, m1], models[1]


def test_parts_give_the_same_checkpoint_as_one_process(tiny, lr_model, tmp_path):
    one = save_quantized(lr_model, tmp_path / "one")
    manifests, model = two_parts(tiny, DiRotQLRConfig(rank=16), tmp_path / "parts", max_shard_size="30KB")
    manifests = json.loads(json.dumps(manifests))  # what all_gather_object would carry
    parts = finalize_checkpoint(model, tmp_path / "parts", manifests[::-1])
    assert not list(parts.glob("dirotq-part-*"))
    a, b = quant_block(one), quant_block(parts)
    assert a["content_hash"] == b["content_hash"] and a["targets"] == b["targets"] and a["config"] == b["config"]
    assert_same_model(load_quantized(one), load_quantized(parts))


def test_incomplete_or_inconsistent_parts_are_refused(tiny, tmp_path):
    (m0, m1), model = two_parts(tiny, RTNConfig(), tmp_path / "p")
    with pytest.raises(ValueError, match=r"expected parts 0\.\.1 once each"):
        finalize_checkpoint(model, tmp_path / "p", [m0])
    with pytest.raises(ValueError, match="exactly one part must include the rest"):
        finalize_checkpoint(model, tmp_path / "p", [m0, {**m1, "include_rest": True}])
    m1_missing = {**m1, "tensors": {k: v for k, v in m1["tensors"].items() if not k.endswith("weight_scale")}}
    with pytest.raises(ValueError, match="finalize_checkpoint: checkpoint is missing key .*weight_scale"):
        finalize_checkpoint(model, tmp_path / "p", [m0, m1_missing])
    os.remove(tmp_path / "p" / m1["files"][0]["file"])
    with pytest.raises(FileNotFoundError, match="has no part file dirotq-part-00001-of-00002"):
        finalize_checkpoint(model, tmp_path / "p", [m0, m1])
    assert not (tmp_path / "p" / CONFIG_NAME).exists()  # nothing half-finished looks like a checkpoint
    with pytest.raises(ValueError, match="quantized_elsewhere names layers quantized in this model"):
        save_quantized_part(model, tmp_path / "x", include_rest=True, quantized_elsewhere=list(
            model._dirotq_quantization["targets"])[:1])


def test_format1_checkpoint_still_loads_and_checks_its_hash(tmp_path):
    qc = quant_block(FORMAT1)
    assert qc["format_version"] == 1 and WEIGHTS_NAME in {f.name for f in FORMAT1.iterdir()}
    m = load_quantized(FORMAT1)
    stored = load_file(str(FORMAT1 / WEIGHTS_NAME))
    assert m.state_dict().keys() == stored.keys()
    assert all(torch.equal(m.state_dict()[k], v) for k, v in stored.items())
    assert isinstance(m.get_submodule("transformer_blocks.0.attn1.to_q"), QuantLinear)
    p = damaged(FORMAT1, tmp_path)
    stored["transformer_blocks.0.attn1.to_q.up"] = stored["transformer_blocks.0.attn1.to_q.up"] * 1.01
    save_file(stored, str(p / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="corrupt or modified checkpoint"):
        load_quantized(p)
    resaved = save_quantized(m, tmp_path / "v2")  # re-saved in the current format, same tensors
    assert quant_block(resaved)["format_version"] == 2 and quant_block(resaved)["content_hash"] != qc["content_hash"]
    assert_same_model(m, load_quantized(resaved))


def test_sharded_damage_is_named(lr_model, tmp_path):
    folder = save_quantized(lr_model, tmp_path / "q", max_shard_size="30KB")
    victim = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))[1]
    tensors = load_file(str(victim))
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1
    save_file(tensors, str(victim))
    with pytest.raises(ValueError, match="corrupt or modified checkpoint"):
        load_quantized(folder)
    assert load_quantized(folder, verify=False) is not None  # verify=False skips only the hash
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing shard {victim.name}"):
        load_quantized(folder)


def test_skeleton_is_built_on_the_meta_device(tiny, saved):
    """load_quantized never builds a random-init float model: parameters start on meta (no memory)."""
    from dirotq.checkpoint import _skeleton

    cfg = json.loads((saved / CONFIG_NAME).read_text())
    qc = cfg.pop("quantization_config")
    skeleton = _skeleton(cfg, qc["targets"])
    assert all(p.is_meta for p in skeleton.parameters())
    q = skeleton.get_submodule("transformer_blocks.0.attn1.to_q")
    assert isinstance(q, QuantLinear) and all(b.is_meta for b in q.buffers())
    assert not any(b.is_meta for b in load_quantized(saved).buffers())
