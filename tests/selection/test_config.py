"""SelectionConfig: defaults, range and type refusals, the mapping path, and how the Reducer and callback take it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from torch import nn

from effilora_lightning import EffiLoRACallback
from effilora_lightning.selection import Reducer, SelectableUnits, SelectionConfig


def _units(n: int = 4) -> SelectableUnits:
    params = tuple(nn.Parameter(torch.ones(2)) for _ in range(n))
    return SelectableUnits(tuple(f"layers.{u}" for u in range(n)), params, torch.arange(n), torch.full((n,), 2))


@pytest.mark.parametrize(("values", "message"), [
    ({"keep_ratio": 0.0}, r"^SelectionConfig\(keep_ratio=0\.0\): must be in \(0, 1\]\.$"),
    ({"importance": "fisher"}, r"^SelectionConfig\(importance='fisher'\): must be one of \('taylor',"),
    ({"selection": "greedy"}, r"selection='greedy'"),
    ({"granularity": "head"}, r"granularity='head'"),
    ({"frozen_score": "revive"}, r"frozen_score='revive'"),
    ({"temperature": -1.0}, r"temperature=-1\.0\): must be > 0"),
    ({"ema_beta": 1.0}, r"ema_beta=1\.0\): must be in \[0, 1\)"),
    ({"warmup_steps": 1.5}, r"warmup_steps=1\.5\): an int >= 0, or a float share in \[0, 1\)"),
    ({"warmup_steps": -1}, r"warmup_steps=-1\)"),
    ({"every_n_steps": 0}, r"every_n_steps=0\): must be >= 1"),
])
def test_out_of_range_settings_are_refused_by_name(values, message):
    with pytest.raises(ValueError, match=message):
        SelectionConfig(**values)


def test_the_callbacks_keywords_are_refused_in_its_name():
    with pytest.raises(ValueError, match=r"^EffiLoRACallback\(keep_ratio=1\.5\): must be in \(0, 1\]"):
        EffiLoRACallback(keep_ratio=1.5)


def test_from_mapping_names_unknown_keys_and_wrong_types():
    with pytest.raises(ValueError, match=r"^selection\.keep_ration is not a setting of SelectionConfig\. "
                                         r"Did you mean 'keep_ratio'.*Known keys: keep_ratio, importance"):
        SelectionConfig.from_mapping({"keep_ration": 0.5})
    with pytest.raises(ValueError, match=r"^reducer\.importance must be one of 'taylor', .*got 'taylr'"):
        SelectionConfig.from_mapping({"importance": "taylr"}, where="reducer")
    with pytest.raises(ValueError, match=r"every_n_steps must be an int, got True"):
        SelectionConfig.from_mapping({"every_n_steps": True})
    with pytest.raises(ValueError, match=r"warmup_steps must be an int or a float, got '10'"):
        SelectionConfig.from_mapping({"warmup_steps": "10"})
    with pytest.raises(TypeError, match="must be a mapping"):
        SelectionConfig.from_mapping([("keep_ratio", 0.5)])


def test_round_trips_through_yaml():
    config = SelectionConfig(keep_ratio=0.25, selection="topk", warmup_steps=0.05, frozen_score="decay", seed=3)
    assert SelectionConfig.from_mapping(yaml.safe_load(yaml.safe_dump(dataclasses.asdict(config)))) == config


def test_warmup_in_steps():
    assert SelectionConfig(warmup_steps=7).warmup_for(100.0) == 7
    assert SelectionConfig(warmup_steps=0.1).warmup_for(125.0) == 12
    assert SelectionConfig(warmup_steps=0.1).warmup_for(float("inf")) == 0  # endless epoch: no share to take
    assert SelectionConfig(warmup_steps=0.1).warmup_for(None) == 0


def test_reducer_takes_a_config_or_keywords_not_both():
    units = _units()
    by_config = Reducer(units, SelectionConfig(keep_ratio=0.25, warmup_steps=0))
    by_keywords = Reducer(units, keep_ratio=0.25, warmup_steps=0)
    assert by_config.config == by_keywords.config and by_config.k == 1
    assert Reducer(units, SelectionConfig(warmup_steps=0.5), steps_per_epoch=10).warmup_steps == 5
    with pytest.raises(TypeError, match="not both"):
        Reducer(units, SelectionConfig(), keep_ratio=0.25)
    with pytest.raises(ValueError, match="Reducer.keep_ration is not a setting"):
        Reducer(units, keep_ration=0.25)
    with pytest.raises(TypeError):
        Reducer(units, 0.25)  # the settings are no longer positional


def test_reducer_start_sets_the_selection_of_a_later_step():
    reducer = Reducer(_units(), SelectionConfig(keep_ratio=0.5, warmup_steps=3, selection="topk"))
    assert reducer.selected.tolist() == [True] * 4  # step 0: warm-up
    reducer.start(3)  # e.g. a run resumed at step 3 from a checkpoint without the callback's state
    assert reducer.selected.tolist() == [True, True, False, False] and reducer.history == []


def test_callback_takes_a_config():
    config = SelectionConfig(keep_ratio=0.25, importance="grad_norm")
    cb = EffiLoRACallback.from_config(config, log_every_n_steps=3, heatmap=False)
    assert cb.config == config and (cb.log_every_n_steps, cb.heatmap) == (3, False)
    assert EffiLoRACallback(keep_ratio=0.25, importance="grad_norm").config == config  # the keywords build the same
    with pytest.raises(TypeError, match="needs a SelectionConfig"):
        EffiLoRACallback.from_config({"keep_ratio": 0.25})


def test_the_callbacks_selection_keywords_are_the_configs_fields():
    """EffiLoRACallback spells the settings out (YAML and LightningCLI read its signature): same names, order,
    defaults and types as SelectionConfig, so the two cannot drift apart."""
    import inspect
    import typing

    params = list(inspect.signature(EffiLoRACallback).parameters.values())[: len(dataclasses.fields(SelectionConfig))]
    hints = typing.get_type_hints(EffiLoRACallback.__init__)
    config_hints = typing.get_type_hints(SelectionConfig)
    for param, field in zip(params, dataclasses.fields(SelectionConfig)):
        assert (param.name, param.default) == (field.name, field.default)
        assert hints[param.name] == config_hints[field.name], field.name
