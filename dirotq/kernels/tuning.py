"""When the kernels autotune their tile configs (a module of its own: every launcher imports it)."""

from __future__ import annotations

import os
from typing import Any

AUTOTUNE_MIN_WEIGHTS = 1 << 20  # layers below this many weights run fixed tile configs


def autotune_enabled(plan: Any) -> bool:
    """Whether a layer's kernels autotune their tile configs. Each autotuned kernel compiles and times
    every config once per shape and token bucket: seconds per layer shape, minutes for a model's
    first forward. That pays on real layers (PixArt-Σ 1152², FLUX 3072² and up: ≥ 1.3 M weights);
    for small ones (the embedded model's 256 × 256 … 256 × 1024) launch overhead dominates whatever
    the tile, so they take the fixed configs (the ones ``DIROTQ_NO_AUTOTUNE=1`` forces everywhere).
    """
    if os.environ.get("DIROTQ_NO_AUTOTUNE"):
        return False
    return plan.o * plan.d >= AUTOTUNE_MIN_WEIGHTS
