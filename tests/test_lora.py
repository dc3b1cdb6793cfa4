"""Claims about LoRA on quantized transformers (dirotq/lora.py): PEFT puts a LoRA on QuantLinear
targets through get_peft_model, diffusers' load_lora_adapter and pipe.load_lora_weights (SANA, FLUX), and the
layer computes y = QuantLinear(x) + scale · B(A(x)); merging into INT4 is refused; training updates
the LoRA parameters only."""

import copy

import pytest
import torch

pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model

from dirotq import DiRotQLRConfig, QuantLinear, RTNConfig, quantize_
from dirotq.models import ADAPTERS

from conftest import calibrated_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    return calibrated_tiny(batches=2, sample_tokens=64)


@pytest.fixture()
def quantized(tiny):
    """A fresh copy of the tiny PixArt with its targets quantized by DiRotQ-LR (rank 16)."""
    _, model, stats, _ = tiny
    m = copy.deepcopy(model)
    quantize_(m, DiRotQLRConfig(rank=16), stats, progress=lambda *a: None)
    return m


def quant_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def randomize(layer, adapter="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    for lin in (layer.lora_A[adapter], layer.lora_B[adapter]):
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.5)


def test_every_quantized_target_gets_a_lora_and_b_zero_changes_nothing(tiny, quantized):
    test = tiny[3]
    with torch.no_grad():
        before = quantized(**test).sample
    names = quant_names(quantized)
    peft_model = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules=names))
    layers = lora_layers(peft_model)
    assert len(layers) == len(names) > 0
    assert all(isinstance(m.get_base_layer(), QuantLinear) for m in layers.values())
    assert all(torch.count_nonzero(m.lora_B["default"].weight) == 0 for m in layers.values())  # PEFT's init
    with torch.no_grad():
        assert torch.equal(peft_model(**test).sample, before)


def test_a_lora_adds_scale_times_x_a_b_to_the_quantized_layer(quantized):
    name = "transformer_blocks.0.attn1.to_q"
    base = quantized.get_submodule(name)
    peft_model = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=12, target_modules=[name]))
    layer = lora_layers(peft_model)[f"base_model.model.{name}"]
    randomize(layer)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(2, 5, base.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, q = layer(x), base(x)
        expected = q + 3.0 * (x @ a.T) @ b.T  # scale = lora_alpha / r = 12 / 4
    assert (y - q).abs().max() > 1.0  # the LoRA term is large compared to the tolerance below
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_merging_into_int4_and_lora_variants_are_refused_and_lose_nothing(tiny, quantized):
    names = quant_names(quantized)
    with pytest.raises(ValueError, match="only plain LoRA runs on a QuantLinear"):
        get_peft_model(copy.deepcopy(quantized), LoraConfig(r=4, use_dora=True, target_modules=names[:1]))
    peft_model = get_peft_model(quantized, LoraConfig(r=4, target_modules=names[:3]))
    for layer in lora_layers(peft_model).values():
        randomize(layer)
    with torch.no_grad():
        before = peft_model(**tiny[3]).sample
    with pytest.raises(ValueError, match="cannot merge a LoRA into a QuantLinear .*transformer_blocks"):
        peft_model.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(peft_model(**tiny[3]).sample, before)


def test_one_training_step_updates_the_lora_parameters_only(tiny, quantized):
    names = quant_names(quantized)
    frozen = {k: v.clone() for k, v in quantized.state_dict().items()}
    peft_model = get_peft_model(quantized, LoraConfig(r=4, target_modules=names))
    for layer in lora_layers(peft_model).values():
        randomize(layer)  # B ≠ 0, so A gets a gradient too
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(names)
    start = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.SGD(trainable.values(), lr=1e-2)
    loss = peft_model(**tiny[3]).sample.pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in peft_model.parameters() if not p.requires_grad)
    opt.step()
    assert all(not torch.equal(p, start[n]) for n, p in trainable.items())
    base = peft_model.get_base_model().state_dict()
    for k, v in frozen.items():  # the quantized layers and every float parameter are untouched
        key = k if k in base else k.replace(k.rpartition(".")[0], k.rpartition(".")[0] + ".base_layer")
        assert torch.equal(base[key], v), k


def lora_state_dict(model, names, rank=4, seed=0):
    """A LoRA in diffusers' format (``transformer.<layer>.lora_A.weight`` …) for ``names``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        q = model.get_submodule(name)
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, q.in_features, generator=g) * 0.3
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(q.out_features, rank, generator=g) * 0.3
    return sd


def check_loaded(model, sd, names):
    """Each named layer is a LoRA on its QuantLinear with the state dict's A and B, and computes
    QuantLinear(x) + A/B's term (diffusers without network alphas: scale 1)."""
    for name in names:
        layer = model.get_submodule(name)
        base = layer.get_base_layer()
        assert isinstance(base, QuantLinear)
        a, b = sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"]
        assert torch.equal(layer.lora_A["x"].weight, a) and torch.equal(layer.lora_B["x"].weight, b)
        x = torch.randn(3, base.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(layer(x), base(x) + (x @ a.T) @ b.T, rtol=1e-5, atol=1e-5)


def test_diffusers_pipe_load_lora_weights_and_unload(tmp_path):
    from diffusers import SanaPipeline

    model = ADAPTERS["sana"].build_tiny(0)
    quantize_(model, RTNConfig(), progress=lambda *a: None)
    example = ADAPTERS["sana"].example_inputs(model, 1, torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(**example).sample
    names = quant_names(model)[:4]
    sd = lora_state_dict(model, names)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=None)
    pipe.load_lora_weights(dict(sd), adapter_name="x")
    check_loaded(model, sd, names)
    with torch.no_grad():
        assert not torch.equal(model(**example).sample, before)
    with pytest.raises(ValueError, match="cannot merge a LoRA into a QuantLinear"):
        pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert set(quant_names(model)) >= set(names) and not lora_layers(model)
    with torch.no_grad():
        assert torch.equal(model(**example).sample, before)


def test_diffusers_load_lora_adapter_on_a_quantized_flux_transformer():
    model = ADAPTERS["flux"].build_tiny(0)
    quantize_(model, RTNConfig(), progress=lambda *a: None)
    names = [n for n in quant_names(model) if ".attn." in n][:3]
    sd = lora_state_dict(model, names, seed=5)
    model.load_lora_adapter(dict(sd), prefix="transformer", adapter_name="x")
    check_loaded(model, sd, names)


def test_flux_pipe_load_lora_weights_on_a_quantized_transformer():
    """FLUX's loader checks each LoRA against the float weight to expand Control LoRAs: the entries
    of quantized targets go around that check (after their width is checked), the rest through it."""
    from diffusers import FluxPipeline

    model = ADAPTERS["flux"].build_tiny(0)
    quantize_(model, RTNConfig(), progress=lambda *a: None)
    example = ADAPTERS["flux"].example_inputs(model, 1, torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(**example).sample
    names = [n for n in quant_names(model) if ".attn." in n][:3]
    sd = lora_state_dict(model, names, seed=5)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)
    pipe.load_lora_weights(dict(sd), adapter_name="x")
    check_loaded(model, sd, names)
    with torch.no_grad():
        assert not torch.equal(model(**example).sample, before)
    pipe.unload_lora_weights()
    assert set(quant_names(model)) >= set(names) and not lora_layers(model)
    with torch.no_grad():
        assert torch.equal(model(**example).sample, before)
    # a LoRA whose input width does not match the quantized layer is refused, naming it
    bad = dict(sd)
    key = next(k for k in bad if k.endswith("lora_A.weight"))
    bad[key] = torch.zeros(bad[key].shape[0], bad[key].shape[1] + 8)
    with pytest.raises(ValueError, match="does not match the quantized layer"):
        pipe.load_lora_weights(bad, adapter_name="y")
