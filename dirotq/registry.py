"""The method registry: every quantization method is one ``MethodSpec``, registered by the file that
defines it (``dirotq/methods/<name>.py``), and every list of methods in the project reads it: the
CLI's choices, the evaluation's method lists, the explorer's menus, the cost model, the figures'
legend. A new method is one file (docs/DESIGN.md §7).

A spec carries what the rest of the project needs to know about a method and nothing else:

- ``config_cls``: its frozen config dataclass (a ``QuantConfig`` subclass; ``config_cls.method`` is
  the registry key, and configs are looked up by their class);
- ``handler(linear, stats, config, *, rank, spec=None, cache=None) -> QuantLinear``: the pure
  function that builds the quantized layer (filling the ``QuantLinear`` fields of its row in
  docs/ARCHITECTURE.md);
- ``cost(d, o, rank, config) -> MethodCost``: what the method adds to plain W4A4 for one layer
  W: (o, d): extra stored tensors in bits (named as ``QuantLinear.storage_bits`` names them), extra
  16-bit FLOPs per token and the width of the 4-bit GEMM;
- ``label`` / ``color``: how figures and menus show it;
- flags: ``ranked`` (has a per-layer 16-bit rank), ``needs_stats`` (needs calibration statistics
  even with RTN weights; GPTQ always does);
- ``rows_independent(config) -> bool``: whether the handler quantizes each output row on its own
  under ``config`` (nothing it builds reads the other rows of W), so ``quantize_`` may quantize a
  large layer a block of rows at a time and concatenate the blocks (same result, a block's memory).

A *preset* is a named recipe of a registered method (``dirotq-paper`` = ``DiRotQConfig.paper()``):
evaluation lists include presets, the explorer's menus show methods only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from .config import QuantConfig, RankPlan

# The method a user gets without asking (CLI ``quantize``/``generate``, the explorer): DiRotQ's
# deployable form. Low-rank PCA + block Hadamard stores O(d·r) per layer where the paper's full
# rotation stores a d×d matrix per input group (72 GiB of rotations for FLUX.1-dev), is what the
# kernels run, and matches or beats the full rotation on images (docs/RESULTS.md). The full rotation
# stays registered as "dirotq".
DEFAULT_METHOD = "dirotq-lr"


@dataclass(frozen=True)
class MethodCost:
    """One layer's cost beyond plain W4A4 (RTN codes + scales + bias).

    extra_bits: {tensor name: bits}; quantized_width: input width of the 4-bit GEMM (d, or d − r
    for the full rotation); flops16: extra 16-bit FLOPs per token; activations_16bit: weight-only.
    """

    extra_bits: Mapping[str, float] = field(default_factory=dict)
    quantized_width: int | None = None
    flops16: float = 0.0
    activations_16bit: bool = False

    @property
    def params16(self) -> float:
        """Extra 16-bit parameters: every extra tensor but the 1-bit Hadamard signs, in 16-bit units."""
        return sum(v for k, v in self.extra_bits.items() if k != "hadamard_signs") / 16.0


@dataclass(frozen=True)
class MethodSpec:
    """Everything the project knows about one method (see the module docstring)."""

    config_cls: type
    handler: Callable[..., Any]
    cost: Callable[[int, int, int, Any], MethodCost]
    label: str
    color: str
    ranked: bool
    needs_stats: bool
    rows_independent: Callable[[Any], bool] = lambda config: False

    @property
    def name(self) -> str:
        return self.config_cls.method

    @property
    def quantizes_activations(self) -> bool:
        """False for weight-only methods (W4A16), whose default config has ``act_bits=None``."""
        return self.config_cls().act_bits is not None


@dataclass(frozen=True)
class Preset:
    """A named recipe of a registered method: its ``settings`` win over the shared settings of an
    evaluation (bits, weights…), explicit overrides win over them."""

    name: str
    method: str
    settings: Mapping[str, Any]
    label: str
    color: str


_METHODS: dict[str, MethodSpec] = {}
_PRESETS: dict[str, Preset] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` (its name is ``spec.config_cls.method``); a name can be registered once."""
    if not (isinstance(spec.config_cls, type) and issubclass(spec.config_cls, QuantConfig)):
        raise TypeError(f"MethodSpec.config_cls must be a QuantConfig subclass, got {spec.config_cls!r}")
    name = spec.name
    if name in _METHODS or name in _PRESETS:
        raise ValueError(f"method {name!r} is already registered")
    _METHODS[name] = spec
    return spec


def register_preset(preset: Preset) -> Preset:
    if preset.method not in _METHODS:
        raise ValueError(f"preset {preset.name!r}: its method {preset.method!r} is not registered")
    if preset.name in _METHODS or preset.name in _PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    _PRESETS[preset.name] = preset
    return preset


def unregister(name: str) -> None:
    """Remove a method (and its presets) or a preset: for tests and plug-in reloads."""
    _PRESETS.pop(name, None)
    if _METHODS.pop(name, None) is not None:
        for p in [p for p in _PRESETS.values() if p.method == name]:
            del _PRESETS[p.name]


def method_names(*, ranked: bool | None = None, activations: bool | None = None) -> tuple[str, ...]:
    """Registered method names in registration order, optionally only ranked / unranked ones or
    only those that do / do not quantize activations."""
    return tuple(n for n, s in _METHODS.items()
                 if (ranked is None or s.ranked == ranked)
                 and (activations is None or s.quantizes_activations == activations))


def preset_names() -> tuple[str, ...]:
    return tuple(_PRESETS)


def get_method(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise ValueError(f"unknown quantization method {name!r}; known: {', '.join(_METHODS)}")
    return _METHODS[name]


def get_preset(name: str) -> Preset:
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(_PRESETS)}")
    return _PRESETS[name]


def spec_for(config: QuantConfig) -> MethodSpec:
    """The spec of ``config``'s class (a config of an unregistered class is an error)."""
    spec = _METHODS.get(getattr(config, "method", None))
    if spec is None or not isinstance(config, spec.config_cls):
        raise ValueError(f"no registered method for config class {type(config).__name__}")
    return spec


def display(name: str) -> tuple[str, str]:
    """(label, colour) of a method or preset name; unknown names show as themselves in gray."""
    if name in _METHODS:
        return _METHODS[name].label, _METHODS[name].color
    if name in _PRESETS:
        return _PRESETS[name].label, _PRESETS[name].color
    return name, "#7f7f7f"


def is_ranked(name: str) -> bool:
    """Whether method or preset ``name`` has a 16-bit rank."""
    if name in _PRESETS:
        return _METHODS[_PRESETS[name].method].ranked
    return get_method(name).ranked


def needs_stats(config: QuantConfig) -> bool:
    """True if ``config`` cannot run without calibration statistics."""
    return config.weights == "gptq" or spec_for(config).needs_stats


def make_config(name: str, base: Mapping[str, Any] | None = None, **overrides: Any) -> QuantConfig:
    """The config of method or preset ``name`` from shared settings ``base`` (bits, group size,
    weights, rank…: fields the method does not have are ignored, so one ``base`` serves every
    method) and ``overrides`` (every one must be a field of the method: a typo is an error)."""
    preset = _PRESETS.get(name)
    cls = (_METHODS[preset.method] if preset else get_method(name)).config_cls
    names = {f.name for f in fields(cls)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"{name} has no settings {bad}; its settings: {sorted(names)}")
    kw = {k: v for k, v in dict(base or {}).items() if k in names}
    kw.update(preset.settings if preset else {})
    kw.update(overrides)
    return cls(**kw)


def config_from_dict(data: Mapping[str, Any]) -> QuantConfig:
    """Inverse of ``QuantConfig.to_dict``; unknown methods or fields are named in the error."""
    data = dict(data)
    method = data.pop("method", None)
    cls = get_method(method).config_cls
    known = {f.name for f in fields(cls)}
    extra = set(data) - known
    if extra:
        raise ValueError(f"{method} config has unknown fields {sorted(extra)}")
    if "rank" in data and isinstance(data["rank"], Mapping):
        data["rank"] = RankPlan.from_dict(data["rank"])
    return cls(**data)


__all__ = ["MethodSpec", "MethodCost", "Preset", "register_method", "register_preset", "unregister", "method_names",
           "preset_names", "get_method", "get_preset", "spec_for", "display", "is_ranked", "needs_stats",
           "make_config", "config_from_dict"]
