"""From the module's selection arguments to the callbacks a fine-tuning run gets: EffiLoRACallback (the
selection, which the paper calls the "Reducer"; EffiLoRA only) and EfficiencyMonitor (perf/*, every method).

Two spellings reach the same callbacks:

    selection: SelectionConfig(...)   typed and validated (YAML: ``selection: {keep_ratio: 0.5, ...}``), with the
                                      module's ``log_every_n_steps``, ``heatmap`` and ``peak_flops`` beside it
    reducer: {...}                    the older single block: the same settings plus those three keys
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from ..adapters import AdapterConfig, EffiLoRAConfig
from ..selection.config import SETTINGS, SelectionConfig, SelectionValueError
from .settings import check_reducer

__all__ = ["SelectionSettings", "build_selection_callbacks", "resolve_selection"]

_LOGGING = ("log_every_n_steps", "heatmap", "peak_flops")


@dataclasses.dataclass(frozen=True)
class SelectionSettings:
    """What the callbacks are built from: the typed selection config and the logging settings."""

    config: SelectionConfig
    log_every_n_steps: int | None = None
    heatmap: bool = True
    peak_flops: float | None = None


def resolve_selection(selection: SelectionConfig | Mapping[str, Any] | None, reducer: Mapping[str, Any] | None,
                      logging: Mapping[str, Any]) -> SelectionSettings:
    """One ``SelectionSettings`` from either spelling; refuses both at once, names bad keys and values
    (``reducer.keep_ration is not an argument ...``, ``reducer: EffiLoRACallback(keep_ratio=2): ...``)."""
    block = check_reducer(reducer)  # names and types, against EffiLoRACallback's signature
    if selection is not None and block:
        raise ValueError("Give the selection settings once: `selection` (typed) or `reducer` (the older block), "
                         "not both.")
    if block:
        settings = {k: v for k, v in block.items() if k in SETTINGS}
        logging = {**logging, **{k: block[k] for k in _LOGGING if k in block}}
        return _settings(settings, logging, where="reducer", owner="EffiLoRACallback")
    if isinstance(selection, Mapping):  # from a checkpoint's hparams, or a plain dict in Python
        selection = SelectionConfig.from_mapping(selection, where="selection")
    if selection is not None and not isinstance(selection, SelectionConfig):
        raise TypeError(f"selection must be a SelectionConfig (or a mapping of its settings), got "
                        f"{type(selection).__name__}.")
    return _settings(dataclasses.asdict(selection) if selection else {}, logging, where="selection",
                     owner="SelectionConfig")


def _settings(values: dict[str, Any], logging: Mapping[str, Any], where: str, owner: str) -> SelectionSettings:
    from ..callbacks.monitor import check_peak_flops

    try:
        check_peak_flops(logging.get("peak_flops"))
        return SelectionSettings(SelectionConfig(**values), **{k: logging[k] for k in _LOGGING if k in logging})
    except SelectionValueError as err:
        raise ValueError(f"{where}: {err.named(owner)}") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def build_selection_callbacks(settings: SelectionSettings, adapter: AdapterConfig | None) -> list[pl.Callback]:
    """[EffiLoRACallback, EfficiencyMonitor] for EffiLoRA, [EfficiencyMonitor] for every other method."""
    from ..callbacks import EfficiencyMonitor, EffiLoRACallback

    callbacks: list[pl.Callback] = []
    if isinstance(adapter, EffiLoRAConfig):
        callbacks.append(EffiLoRACallback.from_config(settings.config, log_every_n_steps=settings.log_every_n_steps,
                                                      heatmap=settings.heatmap))
    return [*callbacks, EfficiencyMonitor(settings.log_every_n_steps, settings.peak_flops)]
