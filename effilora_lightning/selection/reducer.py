"""The Reducer's arithmetic, in pure PyTorch: importance scores, their EMA, and which units to keep.

One optimizer step, as EffiLoRACallback drives it:

    local_unit_scores(units, importance)  -> (U,) on the params' device, from complete local grads
    (callback all-reduces the vector: SUM over shards under FSDP, MEAN over replicas under DDP)
    ImportanceTracker.update(scores, observed)   EMA on CPU; a frozen unit's score stays or decays
    ImportanceTracker.select(k, step)            sample / top-k / random, seeded by (seed, step)

``Reducer`` strings these together for one model, for any training loop, with the settings of a
``SelectionConfig`` (config.py); ``selectable_units(model)`` gives it the units of our EffiLoRA or of a PEFT LoRA
model alike.

No per-parameter kernel loop: scores come from a few ``torch._foreach_*`` calls and one index_add.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .config import FROZEN_SCORE, IMPORTANCE, SELECTION, Importance, Selection, SelectionConfig
from .peft import selectable_units
from .units import SelectableUnits

__all__ = [
    "IMPORTANCE", "SELECTION", "FROZEN_SCORE", "ImportanceTracker", "Reducer", "local_unit_scores", "num_kept",
    "selectable_units", "step_generator",
]


def num_kept(keep_ratio: float, num_units: int) -> int:
    """K = ceil(keep_ratio * units), at least 1."""
    return max(1, min(num_units, math.ceil(keep_ratio * num_units - 1e-9)))


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def local_unit_scores(
    params: Sequence[torch.Tensor], unit_of_param: torch.Tensor, num_units: int, importance: Importance
) -> tuple[torch.Tensor, list[bool]]:
    """Per-unit importance from this rank's (shard of the) parameters and gradients.

    Returns ``(scores, observed)``: scores (U,) float32 on the parameters' device, summable across
    shards (taylor: sum |B * dL/dB|; grad_norm: sum (dL/dB)^2; weight_norm: sum B^2; random: 0);
    observed[u] is False for a unit none of whose B has a gradient this step (it was frozen).
    Call after gradients are complete and reduced.
    """
    has = [p.grad is not None for p in params]
    observed = [False] * num_units
    for u, h in zip(unit_of_param.tolist(), has):
        observed[u] = observed[u] or h
    if importance == "weight_norm":
        observed = [True] * num_units
        idx = list(range(len(params)))
    else:
        idx = [j for j, h in enumerate(has) if h]
    device = params[0].device
    scores = torch.zeros(num_units, dtype=torch.float32, device=device)
    if not idx or importance == "random":
        return scores, observed
    ps = [_local(params[j]).detach() for j in idx]
    if importance == "taylor":
        vals = torch._foreach_norm(torch._foreach_mul(ps, [_local(params[j].grad) for j in idx]), 1)
    elif importance == "grad_norm":
        vals = torch._foreach_pow(torch._foreach_norm([_local(params[j].grad) for j in idx], 2), 2)
    else:
        vals = torch._foreach_pow(torch._foreach_norm(ps, 2), 2)
    owner = unit_of_param[idx].to(device)
    scores.index_add_(0, owner, torch.stack([v.float() for v in vals]))
    return scores, observed


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step): every rank, and a resumed run, draws alike."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


class ImportanceTracker:
    """EMA of per-unit scores (on CPU) and the selection rule.

    Args:
        num_units: how many selectable units.
        ema_beta: weight of the past; a unit's first observation initialises its EMA directly.
        frozen_score: ``"keep"`` leaves a frozen unit's EMA as it was; ``"decay"`` multiplies it by
            ema_beta each step it is frozen (so long-frozen units fade unless sampling revives them).
    """

    def __init__(self, num_units: int, ema_beta: float = 0.85, frozen_score: str = "keep") -> None:
        self.ema = torch.zeros(num_units, dtype=torch.float64)
        self.seen = torch.zeros(num_units, dtype=torch.bool)
        self.ema_beta = ema_beta
        self.frozen_score = frozen_score

    def update(self, scores: torch.Tensor, observed: Sequence[bool]) -> None:
        """Fold one step's reduced scores (U,) into the EMA."""
        s = scores.detach().to("cpu", torch.float64)
        obs = torch.as_tensor(observed, dtype=torch.bool)
        fresh = obs & ~self.seen
        blended = self.ema_beta * self.ema + (1.0 - self.ema_beta) * s
        self.ema = torch.where(fresh, s, torch.where(obs, blended, self.ema))
        if self.frozen_score == "decay":
            self.ema = torch.where(obs, self.ema, self.ema * self.ema_beta)
        self.seen |= obs

    def select(self, k: int, method: Selection, temperature: float, seed: int, step: int) -> torch.Tensor:
        """(U,) bool with exactly k True. Deterministic in (scores, seed, step); ties -> lower index."""
        n = self.ema.numel()
        gen = step_generator(seed, step)
        if method == "topk":
            order = torch.sort(-self.ema, stable=True).indices[:k]
        elif method == "random":
            order = torch.randperm(n, generator=gen)[:k]
        else:
            order = torch.multinomial(self.sample_probs(temperature), k, replacement=False, generator=gen)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order] = True
        return mask

    def sample_probs(self, temperature: float) -> torch.Tensor:
        """softmax(z / T) of the z-scored EMA: scale-free, so one temperature fits any model size."""
        std = self.ema.std(unbiased=False) if self.ema.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        z = (self.ema - self.ema.mean()) / std if std > 0 else torch.zeros_like(self.ema)
        return torch.softmax(z / temperature, dim=0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ema": self.ema.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["ema"].numel() != self.ema.numel():
            raise ValueError(
                f"Checkpointed EffiLoRA state has {state['ema'].numel()} units, the model has {self.ema.numel()}: "
                "the checkpoint belongs to another adapter layout."
            )
        self.ema = state["ema"].to(torch.float64).clone()
        self.seen = state["seen"].to(torch.bool).clone()


class Reducer:
    """The selection EffiLoRA's paper calls the Reducer, without Lightning: which units of B train at each step.

    Drive it from any training loop (EffiLoRACallback does exactly this); ``model`` went through
    ``apply_adapter(model, EffiLoRAConfig(...))`` or ``peft.get_peft_model(model, LoraConfig(...))``::

        reducer = Reducer(selectable_units(model), SelectionConfig(keep_ratio=0.5))
        for step, batch in enumerate(loader):
            reducer.begin_step()                  # before the forward: freeze the unselected B
            loss(model, batch).backward()
            reducer.end_step(step, all_reduce)    # grads complete: score, reduce, EMA, pick next
            optimizer.step(); optimizer.zero_grad(set_to_none=True)

    ``all_reduce(t)`` completes, in place, a vector of per-unit sums across ranks (None in one process): SUM
    where ranks hold shards of B, the mean where they hold replicas.

    Args:
        units: the B to select among (``selectable_units(model, config.granularity)``), built after any sharding.
        config: the settings (default ``SelectionConfig()``).
        steps_per_epoch: optimizer steps in an epoch, for a warm-up given as a share (None: no such warm-up).
        **settings: shorthand for ``config=SelectionConfig(**settings)`` (``Reducer(units, keep_ratio=0.25)``).

    The Reducer owns its state: the selection in force, the EMA, the history. Set it through ``start`` (a fresh
    run, or one resumed without saved state) or ``load_state_dict``; read it through the attributes.
    """

    def __init__(self, units: SelectableUnits, config: SelectionConfig | None = None, *,
                 steps_per_epoch: float | None = None, **settings: Any) -> None:
        if config is not None and not isinstance(config, SelectionConfig):
            raise TypeError(f"Reducer(units, config): config must be a SelectionConfig (settings are keyword-only), "
                            f"got {type(config).__name__}.")
        if config is not None and settings:
            raise TypeError(f"Reducer takes a SelectionConfig or settings as keywords, not both (got {sorted(settings)}).")
        self.config = config if config is not None else SelectionConfig.from_mapping(settings, where="Reducer")
        self.units = units
        self.warmup_steps = self.config.warmup_for(steps_per_epoch)
        self.k = num_kept(self.config.keep_ratio, units.num_units)
        self.tracker = ImportanceTracker(units.num_units, self.config.ema_beta, self.config.frozen_score)
        self.selected: torch.Tensor = torch.ones(units.num_units, dtype=torch.bool)  # (U,) bool in force this step
        self.history: list[torch.Tensor] = []  # the selection of every finished step
        self.start(0)

    def start(self, step: int) -> None:
        """Begin at optimizer step ``step`` without saved state: the selection in force becomes that step's."""
        self.selected = self.decide(step)

    def begin_step(self) -> None:
        """Apply the selection in force (requires_grad mode); call once per optimizer step, before forward."""
        if self.config.freeze_mode == "requires_grad":
            self.units.set_trainable(self.selected)

    def end_step(self, step: int, all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """Gradients of ``step`` are complete: drop unselected ones (grad_drop), score, EMA, choose step + 1."""
        units = self.units
        if self.config.freeze_mode == "grad_drop":
            keep = self.selected.tolist()
            for p, u in zip(units.params, units.unit_of_param.tolist()):
                if not keep[u]:
                    p.grad = None
        scores, observed = local_unit_scores(units.params, units.unit_of_param, units.num_units,
                                             self.config.importance)
        if all_reduce is not None:
            scores, observed = _reduced(scores, observed, all_reduce)
        self.tracker.update(scores.cpu(), observed)  # the one device-to-host transfer (a no-op after packing)
        self.history.append(self.selected.clone())
        self.selected = self.decide(step + 1)

    def decide(self, step: int) -> torch.Tensor:
        """The selection for optimizer step ``step``: all units during warm-up, else K by the rule.

        Pure in the state: it returns the selection and changes nothing (``start`` and ``end_step`` keep it)."""
        n, cfg = self.units.num_units, self.config
        if step < self.warmup_steps:
            return torch.ones(n, dtype=torch.bool)
        held = int(self.selected.sum()) < n  # a selection of K is in force (not the warm-up's all)
        if held and (step - self.warmup_steps) % cfg.every_n_steps:
            return self.selected
        return self.tracker.select(self.k, cfg.selection, cfg.temperature, cfg.seed, step)

    def state_dict(self) -> dict[str, Any]:
        history = torch.stack(self.history) if self.history else torch.zeros(0, self.units.num_units, dtype=torch.bool)
        return {"tracker": self.tracker.state_dict(), "selected": self.selected.clone(), "history": history,
                "unit_names": list(self.units.names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["unit_names"]) != list(self.units.names):
            raise ValueError(
                "The checkpoint's EffiLoRA units differ from this model's "
                f"({len(state['unit_names'])} vs {self.units.num_units}): resume with the same adapter config."
            )
        self.tracker.load_state_dict(state["tracker"])
        self.selected = state["selected"].to(torch.bool).clone()
        self.history = list(state["history"].to(torch.bool).unbind(0))


def _reduced(scores: torch.Tensor, observed: list[bool],
             all_reduce: Callable[[torch.Tensor], None]) -> tuple[torch.Tensor, list[bool]]:
    """Scores and observed flags completed across ranks in one collective and one device-to-host transfer.

    A rank whose shard of a unit's B is empty sees no gradient for it; the OR over ranks is the truth."""
    n = scores.numel()
    packed = torch.cat([scores, torch.tensor(observed, dtype=scores.dtype).to(scores.device)])
    all_reduce(packed)
    packed = packed.cpu()
    return packed[:n], (packed[n:] > 0).tolist()
