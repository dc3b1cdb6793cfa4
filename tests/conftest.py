"""Test session setup: offline hub, Triton interpreter on machines without CUDA, small thread pool;
fixtures shared by several test files."""

import os

# Must happen before anything imports triton or huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: small linear algebra on the 2 shared CPU cores of CI is
    up to ~100× slower with 2 LAPACK threads under contention (spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def calibrated_tiny(family: str = "pixart", *, batches: int = 2, sample_tokens: int = 64,
                    layer_kinds: dict[str, str | None] | None = None):
    """(adapter, tiny random model of ``family``, its calibration statistics over ``batches`` random
    batches, test inputs from another seed): the starting point of the whole-model tests.
    ``layer_kinds``: target-kind overrides (as ``--layer-kind``; the alias "conditioning" allowed),
    applied to the adapter before calibration."""
    from dirotq.calibration import calibrate_transformer
    from dirotq.models import ADAPTERS

    adapter = ADAPTERS[family]
    model = adapter.build_tiny(0)
    if layer_kinds:
        adapter = type(adapter)({**adapter.overrides, **adapter.expand_conditioning(model, layer_kinds)})
    g = torch.Generator().manual_seed(0)
    stats = calibrate_transformer(model, [adapter.example_inputs(model, 2, g) for _ in range(batches)],
                                  adapter=adapter, sample_tokens=sample_tokens)
    return adapter, model, stats, adapter.example_inputs(model, 2, torch.Generator().manual_seed(1))
