"""SelectionConfig: the settings of the selection (the paper's Reducer), one typed, validated dataclass.

Both ``Reducer`` (pure PyTorch) and ``EffiLoRACallback`` (Lightning) take it; YAML blocks and keyword arguments
become one through ``SelectionConfig.from_mapping``, which names an unknown key's closest known ones.
It holds strings and numbers only, so it round-trips through YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "FREEZE_MODE", "FROZEN_SCORE", "GRANULARITY", "IMPORTANCE", "SELECTION", "SETTINGS", "FreezeMode", "FrozenScore",
    "Granularity", "Importance", "Selection", "SelectionConfig", "SelectionValueError", "check_setting",
]

Importance = Literal["taylor", "grad_norm", "weight_norm", "random"]
Selection = Literal["sample", "topk", "random"]
Granularity = Literal["layer", "module"]
FreezeMode = Literal["requires_grad", "grad_drop"]
FrozenScore = Literal["keep", "decay"]

IMPORTANCE: tuple[str, ...] = typing.get_args(Importance)
SELECTION: tuple[str, ...] = typing.get_args(Selection)
GRANULARITY: tuple[str, ...] = typing.get_args(Granularity)
FREEZE_MODE: tuple[str, ...] = typing.get_args(FreezeMode)
FROZEN_SCORE: tuple[str, ...] = typing.get_args(FrozenScore)


class SelectionValueError(ValueError):
    """A setting out of its range, spelled ``Owner(field=value): rule.`` so the message names where it was set."""

    def __init__(self, field: str, value: Any, rule: str, owner: str = "SelectionConfig") -> None:
        self.field, self.value, self.rule = field, value, rule
        super().__init__(f"{owner}({field}={value!r}): {rule}.")

    def named(self, owner: str) -> SelectionValueError:
        """The same error, said of ``owner`` (e.g. ``EffiLoRACallback``, whose keywords built the config)."""
        return SelectionValueError(self.field, self.value, self.rule, owner)


@dataclass(frozen=True)
class SelectionConfig:
    """Which units of B train at each optimizer step, and how they are scored.

    "Reducer" is the EffiLoRA paper's word for this selection part; ``Reducer`` (selection/reducer.py) carries it
    out with these settings, and ``EffiLoRACallback`` drives a ``Reducer`` from a Lightning run.

    Example::

        config = SelectionConfig(keep_ratio=0.25, selection="topk")
        reducer = Reducer(selectable_units(model), config)
    """

    keep_ratio: float = 0.5
    """Share of units trained each step, in (0, 1]; K = ceil(keep_ratio * units): the paper keeps about half."""
    importance: Importance = "taylor"
    """Per-unit score: ``taylor`` (sum |B * dL/dB|, the loss change removing B would cause), ``grad_norm``
    (sum (dL/dB)^2), ``weight_norm`` (sum B^2, needs no gradient) or ``random`` (no score: an ablation)."""
    selection: Selection = "sample"
    """``sample`` (K units without replacement from softmax(z-scored EMA / temperature): low scorers still get
    a turn, so their score can recover), ``topk`` (greedy) or ``random`` (uniform, ignores the scores)."""
    temperature: float = 1.0
    """Sampling temperature, > 0; lower concentrates the draw on the top units (``sample`` only)."""
    ema_beta: float = 0.85
    """EMA weight of past scores, in [0, 1): one step's gradient is noisy, a short memory smooths it."""
    warmup_steps: int | float = 0.1
    """Optimizer steps during which every unit trains (B start at zero: early scores say little); a float in
    (0, 1) is a share of the first epoch's optimizer steps."""
    every_n_steps: int = 1
    """Re-select every n optimizer steps after warm-up; the selection holds in between."""
    granularity: Granularity = "layer"
    """``layer`` (all B of a decoder layer form one unit, the paper's choice) or ``module`` (each adapted
    module's B)."""
    freeze_mode: FreezeMode = "requires_grad"
    """``requires_grad`` (frozen B get no weight gradient: saves compute) or ``grad_drop`` (gradients computed,
    dropped after reduction: for DDP without find_unused_parameters and for torch.compile)."""
    frozen_score: FrozenScore = "keep"
    """A frozen unit has no gradient to score: ``keep`` its EMA, or ``decay`` it by ema_beta each frozen step."""
    seed: int = 0
    """Seeds the per-step draw; with the step it fixes the selection on every rank and across a resume."""

    def __post_init__(self) -> None:
        _check_ranges(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "selection") -> SelectionConfig:
        """A config from a YAML block or keyword arguments; every key and type checked first.

        Raises:
            ValueError: ``{where}.{key} is not a setting ...`` (with the closest known names) for an unknown key,
                ``{where}.{key} must be ...`` for a value of the wrong type, then the range checks'.
        """
        if not isinstance(values, Mapping):
            raise TypeError(f"{where} must be a mapping of SelectionConfig settings, got {type(values).__name__}.")
        for key, value in values.items():
            check_setting(key, value, where)
        return cls(**values)

    def warmup_for(self, steps_per_epoch: float | None) -> int:
        """Warm-up in optimizer steps: an int as given; a float share of ``steps_per_epoch`` (0 when unknown)."""
        if isinstance(self.warmup_steps, int):
            return self.warmup_steps
        if steps_per_epoch is None or not math.isfinite(steps_per_epoch):
            return 0
        return int(self.warmup_steps * steps_per_epoch)


SETTINGS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SelectionConfig))
"""The names of the settings, in order."""


def check_setting(key: str, value: Any, where: str = "selection") -> None:
    """Refuse a key that is not a SelectionConfig setting (naming the closest) or a value not of its type."""
    if key not in SETTINGS:
        close = difflib.get_close_matches(str(key), SETTINGS, n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"{where}.{key} is not a setting of SelectionConfig.{hint} Known keys: {', '.join(SETTINGS)}.")
    hint = typing.get_type_hints(SelectionConfig)[key]
    if not _fits(value, hint):
        raise ValueError(f"{where}.{key} must be {_spelled(hint)}, got {value!r}.")


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of annotation ``hint``: a float takes an int, no number takes a bool."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if typing.get_args(hint):  # int | float
        return any(_fits(value, h) for h in typing.get_args(hint))
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if hint is float else isinstance(value, hint)


def _spelled(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_args(hint):
        return " or ".join(_spelled(h) for h in typing.get_args(hint))
    return f"a{'n' * (hint.__name__[0] in 'aeiou')} {hint.__name__}"


def _check_ranges(config: SelectionConfig) -> None:
    """Each setting in its range; the message names the setting, its value and the rule."""
    if not 0.0 < config.keep_ratio <= 1.0:
        raise SelectionValueError("keep_ratio", config.keep_ratio, "must be in (0, 1]")
    for field, allowed in (("importance", IMPORTANCE), ("selection", SELECTION), ("granularity", GRANULARITY),
                           ("freeze_mode", FREEZE_MODE), ("frozen_score", FROZEN_SCORE)):
        if getattr(config, field) not in allowed:
            raise SelectionValueError(field, getattr(config, field), f"must be one of {allowed}")
    if not config.temperature > 0:
        raise SelectionValueError("temperature", config.temperature, "must be > 0")
    if not 0.0 <= config.ema_beta < 1.0:
        raise SelectionValueError("ema_beta", config.ema_beta, "must be in [0, 1)")
    warmup = config.warmup_steps
    if warmup < 0 or (isinstance(warmup, float) and warmup >= 1.0):
        raise SelectionValueError("warmup_steps", warmup, "an int >= 0, or a float share in [0, 1)")
    if config.every_n_steps < 1:
        raise SelectionValueError("every_n_steps", config.every_n_steps, "must be >= 1")
