"""Test session setup: offline hub, Triton interpreter on machines without CUDA, small thread pool."""

import os

# Must happen before anything imports triton or huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
except ImportError:  # pragma: no cover - torch is a hard requirement
    pass
