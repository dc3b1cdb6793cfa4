"""The settings every method shares (``QuantConfig``) and per-layer rank plans (``RankPlan``).

Each method's own config subclasses ``QuantConfig`` in its file under ``dirotq/methods/`` and is
registered there (``dirotq.registry``). Configs are small frozen dataclasses that validate on
construction, naming the offending field, and round-trip through JSON (``to_dict`` /
``dirotq.registry.config_from_dict``). A rank plan is checked against a model exactly once, by
``RankPlan.resolve``, where it becomes the per-layer ranks every later step uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping, Union

from .quantizers import SCALE_FORMATS

DEFAULT_KEY = "_default"
# target kinds whose activations stay 16-bit (no rank), by the bits their weights get from a 4-bit config
WEIGHT_ONLY_KINDS = {"w4a16": 4, "w8a16": 8}
KINDS = ("w4a4", *WEIGHT_ONLY_KINDS)  # what a quantization target can be (TargetSpec.kind)


def weight_only_bits(kind: str, config_bits: int) -> int:
    """Weight bits of a weight-only target of ``kind`` under a config with ``config_bits``-bit weights:
    W4A16 follows the config (8 or 16 in studies); W8A16 keeps 8 bits unless the config keeps 16."""
    return 8 if kind == "w8a16" and config_bits != 16 else config_bits


@dataclass(frozen=True)
class RankPlan:
    """Per-layer 16-bit ranks: ``{layer name: rank}`` with ``"_default"`` for the rest.

    The special value ``"paper"`` for a rank means the paper's d/8 rounded up to a multiple of 64.
    """

    ranks: Mapping[str, Union[int, str]] = field(default_factory=lambda: {DEFAULT_KEY: 32})

    def __post_init__(self) -> None:
        if not isinstance(self.ranks, Mapping):
            raise TypeError(f"RankPlan.ranks must be a mapping of layer name to rank, got {type(self.ranks).__name__}")
        for name, r in self.ranks.items():
            if not isinstance(name, str):
                raise TypeError(f"RankPlan: layer names must be strings, got {name!r}")
            if r == "paper":
                continue
            if not isinstance(r, int) or isinstance(r, bool):
                raise TypeError(f"RankPlan: rank of {name!r} must be an int or 'paper', got {r!r}")
            if r < 0:
                raise ValueError(f"RankPlan: rank of {name!r} must be ≥ 0, got {r}")
        object.__setattr__(self, "ranks", dict(self.ranks))

    def rank_for(self, name: str, width: int | None = None) -> int:
        """Rank of layer ``name`` (its own entry, else ``_default``, else 0); 'paper' needs ``width``."""
        r = self.ranks.get(name, self.ranks.get(DEFAULT_KEY, 0))
        if r == "paper":
            if width is None:
                raise ValueError(f"rank 'paper' of {name!r} needs the layer width")
            from .bases import paper_rank

            return paper_rank(width)
        return int(r)

    def resolve(self, targets: Mapping[str, Any]) -> dict[str, int]:
        """The rank of every target, checked against the model: the one place a rank is validated.

        targets: name -> spec with ``in_features`` and ``kind`` ("w4a4" or weight-only "w4a16" /
        "w8a16"; a TargetSpec).
        ``_default`` applies to the W4A4 targets only: a weight-only target has rank 0 (no 16-bit
        branch) unless the plan names it, which gives it a 16-bit low-rank branch of that rank beside
        its 16-bit activations (``dirotq.methods.weight_only_branch_config``; PCA methods only).
        A named layer that is not a target or a rank above the layer's input width is an error
        naming the layer. Returns ``{name: rank}`` for every target.
        """
        unknown = [n for n in self.ranks if n != DEFAULT_KEY and n not in targets]
        if unknown:
            sample = ", ".join(sorted(targets)[:3])
            raise ValueError(f"rank plan names layers this model does not have: {unknown[:5]} "
                             f"(is it a plan for another model? this one has e.g. {sample})")
        out = {}
        for name, spec in targets.items():
            weight_only = getattr(spec, "kind", "w4a4") in WEIGHT_ONLY_KINDS
            if weight_only and name not in self.ranks:
                out[name] = 0
                continue
            d = spec.in_features
            r = self.rank_for(name, d)
            if r > d:
                raise ValueError(f"rank {r} for {name!r} exceeds its input width {d}")
            out[name] = r
        return out

    def to_dict(self) -> dict:
        return dict(self.ranks)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RankPlan":
        if not isinstance(data, Mapping):
            raise ValueError(f"a rank plan is a JSON object {{layer: rank}}, got {type(data).__name__}")
        return cls(dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RankPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"rank plan is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "RankPlan":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"rank plan file not found: {p}")
        return cls.from_json(p.read_text())


def as_rank_plan(rank: Union[int, str, RankPlan, Mapping[str, Any]]) -> RankPlan:
    if isinstance(rank, RankPlan):
        return rank
    if isinstance(rank, Mapping):
        return RankPlan.from_dict(rank)
    return RankPlan({DEFAULT_KEY: rank})


@dataclass(frozen=True)
class QuantConfig:
    """Settings shared by every method (same quantizer everywhere, so comparisons are fair).

    weight_bits: 4 or 8 (16 keeps weights unquantized: activation-only studies);
    act_bits: 4, 8 or None (weight-only, W4A16); group_size along the input dimension;
    act_symmetric: symmetric [-8, 7] or asymmetric [0, 15] activation codes;
    scale_format: "exact" (format A) or "int_ratio" (format C);
    weights: "rtn" or "gptq" (damping, block, act-order below).
    """

    method: ClassVar[str] = "base"
    weight_bits: int = 4
    act_bits: int | None = 4
    group_size: int = 64
    act_symmetric: bool = True
    scale_format: str = "exact"
    weights: str = "rtn"
    gptq_damping: float = 0.01
    gptq_block: int = 128
    gptq_act_order: bool = False

    def __post_init__(self) -> None:
        if self.weight_bits not in (4, 8, 16):
            raise ValueError(f"weight_bits must be 4, 8 or 16, got {self.weight_bits}")
        if self.act_bits not in (4, 8, None):
            raise ValueError(f"act_bits must be 4, 8 or None (weight-only), got {self.act_bits}")
        if self.group_size <= 0 or self.group_size % 2:
            raise ValueError(f"group_size must be a positive even number, got {self.group_size}")
        if self.scale_format not in SCALE_FORMATS:
            raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {self.scale_format!r}")
        if self.weights not in ("rtn", "gptq"):
            raise ValueError(f"weights must be 'rtn' or 'gptq', got {self.weights!r}")
        if not 0 <= self.gptq_damping < 1:
            raise ValueError(f"gptq_damping must be in [0, 1), got {self.gptq_damping}")
        if self.gptq_block <= 0 or self.gptq_block % self.group_size:
            raise ValueError(f"gptq_block must be a positive multiple of group_size, got {self.gptq_block}")

    def rank_plan(self) -> RankPlan:
        """Methods without a 16-bit branch have rank 0 everywhere."""
        return RankPlan({DEFAULT_KEY: 0})

    def weight_settings(self) -> dict[str, Any]:
        """How the weights are quantized (group, scale format, RTN/GPTQ and its settings): what a
        weight-only target inherits from the model's config, whatever its method."""
        return {k: getattr(self, k) for k in ("group_size", "scale_format", "weights", "gptq_damping", "gptq_block",
                                              "gptq_act_order")}

    def to_dict(self) -> dict:
        data = {"method": self.method}
        for f in fields(self):
            v = getattr(self, f.name)
            data[f.name] = v.to_dict() if isinstance(v, RankPlan) else v
        return data

    def tag(self) -> str:
        """Short recipe name, e.g. ``dirotq-w4a4-g64-r32`` (``-gptq`` / ``-int_ratio`` when not the default)."""
        a = f"a{self.act_bits}" if self.act_bits else "a16"
        w = f"w{self.weight_bits}"
        r = self.rank_plan().ranks.get(DEFAULT_KEY, 0)
        rank = f"-r{r}" if r else ""
        return (f"{self.method}-{w}{a}-g{self.group_size}{rank}" + ("-gptq" if self.weights == "gptq" else "")
                + ("-int_ratio" if self.scale_format == "int_ratio" else ""))


@dataclass(frozen=True)
class RankedConfig(QuantConfig):
    """Base of the methods with a per-layer 16-bit rank (an int, "paper" or a ``RankPlan``)."""

    rank: Union[int, str, RankPlan] = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "rank", as_rank_plan(self.rank))

    def rank_plan(self) -> RankPlan:
        return self.rank


def config_to_json(config: QuantConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


__all__ = ["RankPlan", "QuantConfig", "RankedConfig", "as_rank_plan", "config_to_json", "DEFAULT_KEY"]
