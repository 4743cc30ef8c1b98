"""Up-front checks of the modules' settings: every number in range, the ``reducer`` block, token ids.

All of them run before training starts (``__init__``, or ``configure_model`` once the model exists), and every
message names the key or token at fault and what to do, so that a bad setting never costs a run:

    check_settings(owner, values)    numeric settings (learning rates, warm-up, generation) against their ranges
    check_reducer(reducer)           the ``reducer`` block against EffiLoRACallback's signature (names and types)
    check_token_ids(tokenizer, ...)  pad / bos / eos / template special ids against the input-embedding rows
"""

from __future__ import annotations

import difflib
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["attention_implementations", "check_reducer", "check_settings", "check_token_ids"]

Check = tuple[Callable[[Any], bool], str]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _warmup(value: Any) -> bool:
    if _integer(value):
        return value >= 0
    return isinstance(value, float) and 0.0 <= value < 1.0


_NON_NEGATIVE: Check = (lambda v: _number(v) and v >= 0, "a number >= 0")
_OPTIONAL_LR: Check = (lambda v: v is None or (_number(v) and v >= 0),
                       "a number >= 0 (0 freezes that group) or null (use learning_rate)")
_AT_LEAST_ONE: Check = (lambda v: _integer(v) and v >= 1, "an integer >= 1")

SETTINGS: dict[str, Check] = {
    "learning_rate": _NON_NEGATIVE,
    "lr_shared_a": _OPTIONAL_LR,
    "lr_b": _OPTIONAL_LR,
    "lr_router": _OPTIONAL_LR,
    "lr_projector": _NON_NEGATIVE,
    "weight_decay": _NON_NEGATIVE,
    "adamw_implementation": (lambda v: v in ("fused", "foreach", "for_loop"), "fused, foreach or for_loop"),
    "warmup_steps": (_warmup, "an integer >= 0 (optimizer steps) or a float in [0, 1) (share of all steps)"),
    "min_lr_ratio": (lambda v: _number(v) and 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "max_new_tokens": _AT_LEAST_ONE,
    "num_beams": _AT_LEAST_ONE,
    "init_seed": (_integer, "an integer"),
    "select_layer": (_integer, "an integer (a vision-tower block index; -2 = second to last)"),
    "attn_implementation": (lambda v: v is None or v in attention_implementations(),
                            "null (transformers' default, sdpa) or one of transformers' attention implementations "
                            "(eager, sdpa, sdpa_packed, flash_attention_2, ...)"),
}
"""Key -> (test, what the value must be). Keys a module does not take are skipped."""


def attention_implementations() -> set[str]:
    """The ``attn_implementation`` names transformers knows here: ``eager`` and every registered attention
    function (``sdpa``, the flash and flex kernels, this package's ``sdpa_packed``)."""
    from transformers import AttentionInterface

    import effilora_lightning.models.packed_attention  # noqa: F401  (registers sdpa_packed)

    return {"eager", *AttentionInterface._global_mapping}


def check_settings(owner: str, values: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the first setting of ``values`` out of its range (see ``SETTINGS``)."""
    for key, (ok, expected) in SETTINGS.items():
        if key in values and not ok(values[key]):
            raise ValueError(f"{owner}: {key} must be {expected}, got {values[key]!r}.")


# ---------------------------------------------------------------------------------------------- reducer block
def check_reducer(reducer: Mapping[str, Any] | None, target: Callable[..., Any] | None = None) -> dict[str, Any]:
    """The ``reducer`` block as keyword arguments of ``target`` (EffiLoRACallback), checked against its signature.

    Unknown keys are refused by name with the closest known ones; a value whose type the signature does not
    allow is refused with the argument's description from the docstring. Ranges stay the callback's to check.
    """
    if target is None:
        from ..callbacks import EffiLoRACallback

        target = EffiLoRACallback
    if reducer is None:
        return {}
    if not isinstance(reducer, Mapping):
        raise TypeError(f"reducer must be a mapping of EffiLoRACallback arguments, got {type(reducer).__name__}.")
    params = {n: p for n, p in inspect.signature(target).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD}
    hints = typing.get_type_hints(target.__init__)
    for key, value in reducer.items():
        if key not in params:
            close = difflib.get_close_matches(str(key), list(params), n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"reducer.{key} is not an argument of {target.__name__}.{hint} "
                             f"Known keys: {', '.join(params)}.")
        hint = hints.get(key, inspect.Parameter.empty)
        if hint is not inspect.Parameter.empty and not _fits(value, hint):
            about = _described(target, key)
            raise ValueError(f"reducer.{key} must be {_spelled(hint)}{f' ({about})' if about else ''}, "
                             f"got {value!r}.")
    return dict(reducer)


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of annotation ``hint`` (float takes an int, no number takes a bool)."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return _number(value)
    if hint is int:
        return _integer(value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _spelled(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_spelled(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return f"a{'n' * (getattr(hint, '__name__', ' ')[0] in 'aeiou')} {getattr(hint, '__name__', hint)}"


def _described(target: Callable[..., Any], key: str) -> str:
    """The ``key:`` entry of the target's ``Args:`` docstring section, on one line ('' when absent)."""
    doc = inspect.getdoc(target) or ""
    match = re.search(rf"^([ \t]*){re.escape(key)}: (.+?)(?=^\1\S|^[ \t]*$|\Z)", doc, flags=re.M | re.S)
    return " ".join(match.group(2).split()).rstrip(".") if match else ""


# ---------------------------------------------------------------------------------------------- token ids
def check_token_ids(tokenizer: Any, rows: int, extra_tokens: Iterable[str] = (), where: str = "the model") -> None:
    """Refuse a tokenizer whose pad, bos, eos, unk or template special tokens have ids past the embedding table.

    A pad token that is not in the vocabulary is appended by Hugging Face as id = vocabulary size: the first
    batch that holds padding would index past the model's ``rows`` input embeddings.
    """
    named = [(f"{role} token", getattr(tokenizer, f"{role}_token", None)) for role in ("pad", "bos", "eos", "unk")]
    named += [("template token", t) for t in extra_tokens]
    for role, token in named:
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and not 0 <= token_id < rows:
            raise ValueError(
                f"The tokenizer's {role} {token!r} has id {token_id}, but {where} has {rows} input embeddings "
                f"(ids 0..{rows - 1}): the tokenizer added it beyond the model's vocabulary, and the first batch "
                f"using it would index out of range. Use a tokenizer that matches the model, or pick a {role} "
                "the model already has (data.init_args.pad_token: a reserved special token)."
            )
