"""Quantization configs and rank plans (CONVENTIONS.md "Python API").

Every method is one small frozen dataclass, registered by its ``method`` name; ``quantize_`` maps
the config to the method's handler. All configs round-trip through JSON (``to_dict`` /
``config_from_dict``) and validate on construction, naming the offending field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping, Union

from .quantizers import SCALE_FORMATS

DEFAULT_KEY = "_default"


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

    def validate(self, widths: Mapping[str, int]) -> None:
        """Check every named layer exists and every rank fits its layer (``widths``: name -> d_in)."""
        unknown = [n for n in self.ranks if n != DEFAULT_KEY and n not in widths]
        if unknown:
            sample = ", ".join(sorted(widths)[:3])
            raise ValueError(f"rank plan names layers this model does not have: {unknown[:5]} "
                             f"(is it a plan for another model? this one has e.g. {sample})")
        for name, d in widths.items():
            r = self.rank_for(name, d)
            if r > d:
                raise ValueError(f"rank {r} for {name!r} exceeds its input width {d}")

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


_REGISTRY: dict[str, type["QuantConfig"]] = {}


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

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _REGISTRY[cls.method] = cls

    def __post_init__(self) -> None:
        if self.weight_bits not in (4, 8, 16):
            raise ValueError(f"weight_bits must be 4, 8 or 16, got {self.weight_bits}")
        if self.act_bits not in (4, 8, None):
            raise ValueError(f"act_bits must be 4, 8 or None (weight-only), got {self.act_bits}")
        if self.group_size <= 0 or self.group_size % 2:
            raise ValueError(f"group_size must be a positive even number, got {self.group_size}")
        if self.scale_format not in SCALE_FORMATS:
            raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {self.scale_format!r}")
        if self.scale_format == "int_ratio" and not self.act_symmetric and self.act_bits is not None:
            raise ValueError("scale_format='int_ratio' needs act_symmetric=True (the fast format has no zero point)")
        if self.weights not in ("rtn", "gptq"):
            raise ValueError(f"weights must be 'rtn' or 'gptq', got {self.weights!r}")
        if not 0 <= self.gptq_damping < 1:
            raise ValueError(f"gptq_damping must be in [0, 1), got {self.gptq_damping}")
        if self.gptq_block <= 0 or self.gptq_block % self.group_size:
            raise ValueError(f"gptq_block must be a positive multiple of group_size, got {self.gptq_block}")

    def rank_plan(self) -> RankPlan:
        """Methods without a 16-bit branch have rank 0 everywhere."""
        return RankPlan({DEFAULT_KEY: 0})

    def to_dict(self) -> dict:
        data = {"method": self.method}
        for f in fields(self):
            v = getattr(self, f.name)
            data[f.name] = v.to_dict() if isinstance(v, RankPlan) else v
        return data

    def tag(self) -> str:
        """Short recipe name, e.g. ``dirotq-w4a4-g64-r32``."""
        a = f"a{self.act_bits}" if self.act_bits else "a16"
        w = f"w{self.weight_bits}"
        r = self.rank_plan().ranks.get(DEFAULT_KEY, 0)
        rank = f"-r{r}" if r else ""
        return f"{self.method}-{w}{a}-g{self.group_size}{rank}" + ("-gptq" if self.weights == "gptq" else "")


def config_from_dict(data: Mapping[str, Any]) -> QuantConfig:
    """Inverse of ``QuantConfig.to_dict``; unknown methods or fields are named in the error."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in _REGISTRY or method == "base":
        raise ValueError(f"unknown quantization method {method!r}; known: {sorted(k for k in _REGISTRY if k != 'base')}")
    cls = _REGISTRY[method]
    known = {f.name for f in fields(cls)}
    extra = set(data) - known
    if extra:
        raise ValueError(f"{method} config has unknown fields {sorted(extra)}")
    if "rank" in data and isinstance(data["rank"], Mapping):
        data["rank"] = RankPlan.from_dict(data["rank"])
    return cls(**data)


def registered_methods() -> list[str]:
    return sorted(k for k in _REGISTRY if k != "base")


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Round-to-nearest W4A4, no transform: the floor every method must beat."""

    method: ClassVar[str] = "rtn"


@dataclass(frozen=True)
class W4A16Config(QuantConfig):
    """Weight-only INT4 (activations stay 16-bit): the reference point."""

    method: ClassVar[str] = "w4a16"
    act_bits: int | None = None


@dataclass(frozen=True)
class SmoothQuantConfig(QuantConfig):
    """SmoothQuant: per-channel s_j = max|x_j|^α / max|W_j|^(1−α) moved from activations to weights."""

    method: ClassVar[str] = "smoothquant"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class QuaRotConfig(QuantConfig):
    """QuaRot-style randomized Hadamard on the layer input (folded into the weight)."""

    method: ClassVar[str] = "quarot"
    hadamard: str = "dense"  # "dense": full (or largest power-of-two block) Hadamard; "block": group-size blocks
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hadamard not in ("dense", "block"):
            raise ValueError(f"hadamard must be 'dense' or 'block', got {self.hadamard!r}")


@dataclass(frozen=True)
class _RankedConfig(QuantConfig):
    rank: Union[int, str, RankPlan] = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "rank", as_rank_plan(self.rank))

    def rank_plan(self) -> RankPlan:
        return self.rank


@dataclass(frozen=True)
class SVDQuantConfig(_RankedConfig):
    """SVDQuant: smoothing, then a rank-r 16-bit weight-SVD branch, 4-bit residual."""

    method: ClassVar[str] = "svdquant"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


BASES = ("pca", "wsvd", "hsvd")


@dataclass(frozen=True)
class DiRotQConfig(_RankedConfig):
    """DiRotQ, full rotation (the paper's form): x T with T = V·diag(I_r, R); first r coefficients
    16-bit, the rest INT4.

    tail_rotation: "haar" (paper), "hadamard" or "none"; seed: of R (paper: 42).
    weight_basis: "folded" (quantize W T, what a kernel runs) or "original" (quantize W unrotated,
    rotate activations back after quantization: the paper's reference code).
    keep_head_weights: the r columns of W T that meet 16-bit coefficients stay 16-bit.
    per_head_out_proj: block-diagonal per-head basis for attention output projections.
    """

    method: ClassVar[str] = "dirotq"
    tail_rotation: str = "haar"
    seed: int = 42
    weight_basis: str = "folded"
    keep_head_weights: bool = True
    per_head_out_proj: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tail_rotation not in ("haar", "hadamard", "none"):
            raise ValueError(f"tail_rotation must be 'haar', 'hadamard' or 'none', got {self.tail_rotation!r}")
        if self.weight_basis not in ("folded", "original"):
            raise ValueError(f"weight_basis must be 'folded' or 'original', got {self.weight_basis!r}")

    @classmethod
    def paper(cls, **overrides) -> "DiRotQConfig":
        """The authors' reference code as read from it (DESIGN.md "The paper preset")."""
        base = dict(rank="paper", tail_rotation="haar", seed=42, act_symmetric=False, weights="gptq",
                    gptq_act_order=True, keep_head_weights=True, weight_basis="folded")
        base.update(overrides)
        return cls(**base)


@dataclass(frozen=True)
class DiRotQLRConfig(_RankedConfig):
    """DiRotQ low-rank + Hadamard (kernel-friendly): c = x V_r in 16-bit, the residual
    x − c V_rᵀ quantized after a blockwise randomized Hadamard. ``basis``: "pca" (activation PCA),
    "wsvd" (weight SVD) or "hsvd" (activation-weighted weight SVD, ``hsvd_lambda``)."""

    method: ClassVar[str] = "dirotq-lr"
    basis: str = "pca"
    hsvd_lambda: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {self.basis!r}")
        if self.hsvd_lambda <= 0:
            raise ValueError(f"hsvd_lambda must be > 0, got {self.hsvd_lambda}")


def config_to_json(config: QuantConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


__all__ = [
    "RankPlan", "QuantConfig", "RTNConfig", "W4A16Config", "SmoothQuantConfig", "QuaRotConfig",
    "SVDQuantConfig", "DiRotQConfig", "DiRotQLRConfig", "config_from_dict", "registered_methods",
    "as_rank_plan", "DEFAULT_KEY", "asdict",
]
