"""The built-in quantization methods, one file each (docs/DESIGN.md §7).

Each file defines its config class, its handler

    handler(linear: nn.Linear, stats: LayerStats | None, config, *, rank: int,
            spec: TargetSpec | None = None, cache: BasisCache | None = None) -> QuantLinear

(filling exactly the QuantLinear fields of its row in docs/ARCHITECTURE.md), its cost, label and
colour, and registers them as one ``dirotq.registry.MethodSpec``. Importing this package registers
them, in the order menus and tables list them.
"""

from __future__ import annotations

from .dirotq import DiRotQConfig
from .dirotq_lr import BRANCH_METHODS, DiRotQLRConfig, weight_only_branch_config
from .svdquant import SVDQuantConfig
from .quarot import QuaRotConfig
from .smoothquant import SmoothQuantConfig
from .rtn import RTNConfig
from .w4a16 import W4A16Config, weight_only_config, weight_only_target_config

__all__ = ["DiRotQConfig", "DiRotQLRConfig", "SVDQuantConfig", "QuaRotConfig", "SmoothQuantConfig", "RTNConfig",
           "W4A16Config", "weight_only_config", "weight_only_branch_config", "weight_only_target_config",
           "BRANCH_METHODS"]
