"""Quality, second round (issue 18): does selective B update earn its keep on a base where selection has room?

    python benchmarks/quality2.py --json benchmarks/results/quality2_cpu.json            # the study, ~80 min
    python benchmarks/quality2.py --arms effilora_k0.5_detach --json extra.json          # one more arm, same protocol
    python benchmarks/quality2.py --report benchmarks/results/quality2_cpu.json extra.json   # merge, tables, plot
    python benchmarks/quality2.py --smoke --json /tmp/quality2_smoke.json                # a few steps, < 60 s
    python benchmarks/quality2.py --steps 800 --eval-at 300 800 --chosen-lrs lora=5e-3 ... --json q3.json  # round 3

``--eval-at S1 S2 ...`` (round 3, last = ``--steps``): the same test and the validation loss at those optimizer
steps of one run, stored as the run's ``curve``; ``--report`` adds rows and paired differences per step. The cosine
schedule spans ``--steps``, so the 300-step point of an 800-step run is not a 300-step run.

``choice_scoring`` (round 4, on by default): after the greedy test, every run also scores each test question's
listed answers teacher-forced (``choice_accuracy``: the likeliest answer after prompt + "the correct answer is")
and the gold answer's tokens on the validation split (``val_answer_loss``), which the learning-rate search then
compares instead of the mean response loss. Why: the tiny bases never saw the token " correct", so greedy
generation leaves the training distribution at the second response token and the response loss is mostly that
token (``choice_scoring``'s docstring; BENCHMARKS.md, fourth round). Runs without these fields (earlier rounds)
are reported and searched as before.

The base is ``data/checkpoints/tiny-llama-deep`` (12 layers, hidden 48: 12 units at layer granularity, 60 at
module granularity), built by ``data/scripts/make_tiny_llama.py`` on the same synthetic world as the 4-layer base.
Every run goes through the product's own path, as ``benchmarks/quality.py`` (whose data module, Trainer and
settings this script reuses): ``CausalLMModule(adapter=..., model_path=..., reducer={...})``,
``CommonsenseDataModule``, ``lightning.Trainer`` on CPU, ``--jobs`` one-thread worker processes.

Protocol (the same for every arm):
  * Rank 8 on q, k, v, up, down; 300 optimizer steps of 16 examples; loss on the response only; 10 warm-up
    steps then cosine; EffiLoRA: one A per module type, 10 Reducer warm-up steps, ema_beta 0.85, temperature 1.
  * Tuning budget: LoRA and EffiLoRA keep 1.0 each try every rate of ``--lrs`` on the first seed and keep the
    one with the lowest validation loss (64 examples held out of the TRAINING file; never the test sets).
    The other seeds run at that rate. Every other EffiLoRA arm (keep < 1, random, detach, the fix prototypes)
    is the same adapter with another rule for which B update, and runs at keep 1.0's rate (``lr_from``): its
    paired difference isolates the rule, at the cost of no search of its own (a keep < 1 run might prefer a
    higher rate; on this box there was no time to search it, see BENCHMARKS.md).
  * Seeds are paired: seed s fixes the data order and validation split, the adapter init (A is the same
    Kaiming draw for every EffiLoRA arm) and the Reducer's draws, identically for every arm.
  * Test: greedy generation on all 384 test questions (48 per task), first answer-pattern match.
  * Reported: per arm, mean and 95 % t-interval over seeds; for the questions of the issue, the mean of the
    seed-paired differences with its 95 % t-interval (n - 1 degrees of freedom).
  * Per run, for the collapse analysis: the training-loss curve, which units each step trained (a bit mask per
    step), the EMA scores every 25 steps, each unit's final |B|, and the optimizer-state bytes.
  * Cost (``--report``, in this process, one thread): FLOPs of one training step counted by
    ``torch.utils.flop_counter`` (forward + backward, with the arm's selection applied; mean over 4 seeded
    selections), minus the floor's (the frozen base with gradients through activations only): adapter FLOPs
    per token of the batch; trainable and updated-per-step parameters; AdamW state bytes (measured in the runs).
  * ``--timing R``: R rounds; in each, every arm and the floor run ``--timing-steps`` steps in a shuffled
    order (forward + backward + AdamW + Reducer), and each arm's median step is divided by the floor's of the
    same round. Reported: the ratio's mean and 95 % t-interval over rounds (never a lone absolute time).

Two arms prototype changes to the Reducer's sampling, for the collapse analysis (issue 18, point 3), without
touching the package: ``*_prop`` (``ProportionalTracker``) samples units in proportion to their EMA score
instead of softmax(z-score / T): the z-score stretches scores that differ by 10-20 % into 10:1 odds, so the
same two or three layers train almost every step. ``*_revive`` (``ReviveTracker``) lets a frozen unit's score
grow by 1 / ema_beta per frozen step, up to the highest score observed that step, so no unit stays frozen on a
stale score.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import choice_scoring  # noqa: E402  (benchmarks/ is not a package)
import quality as q1  # noqa: E402

ROOT = q1.ROOT
TARGETS = q1.TARGETS
DEEP = ROOT / "data/checkpoints/tiny-llama-deep"


@dataclass(frozen=True)
class Arm:
    """One row: an adapter and, for EffiLoRA, how the Reducer picks the B that train."""

    name: str
    kind: str  # lora | effilora | hydralora | lily
    keep_ratio: float = 1.0
    importance: str = "taylor"  # taylor | grad_norm | random
    selection: str = "sample"  # sample | random
    granularity: str = "layer"
    detach: bool = False  # EffiLoRAConfig(detach_frozen=True): a frozen unit's low-rank path has no autograd
    revive: bool = False  # ReviveTracker: frozen units' scores grow back (a collapse-fix prototype)
    proportional: bool = False  # ProportionalTracker: sample in proportion to the score (a collapse-fix prototype)
    lr_from: str | None = None  # a variant of this arm: runs at that arm's chosen rate (no search of its own)


ARMS = [  # in priority order: a run cut short has the first arms of every seed it reached
    Arm("lora", "lora"),
    Arm("effilora_k1.0", "effilora", 1.0),
    Arm("effilora_k0.5", "effilora", 0.5, lr_from="effilora_k1.0"),
    Arm("effilora_k0.5_random", "effilora", 0.5, "random", "random", lr_from="effilora_k1.0"),
    Arm("effilora_k0.25", "effilora", 0.25, lr_from="effilora_k1.0"),
    Arm("effilora_k0.25_random", "effilora", 0.25, "random", "random", lr_from="effilora_k1.0"),
    Arm("effilora_k0.5_detach", "effilora", 0.5, detach=True, lr_from="effilora_k1.0"),
    Arm("effilora_k0.5_prop", "effilora", 0.5, proportional=True, lr_from="effilora_k1.0"),
    Arm("effilora_k0.5_grad_norm", "effilora", 0.5, "grad_norm", lr_from="effilora_k1.0"),
    Arm("effilora_k0.5_revive", "effilora", 0.5, revive=True, lr_from="effilora_k1.0"),
    Arm("effilora_k0.5_module", "effilora", 0.5, granularity="module", lr_from="effilora_k1.0"),
    Arm("effilora_k0.5_tuned", "effilora", 0.5),  # keep 0.5 with a search of its own: is keep 1.0's rate unfair?
    Arm("hydralora", "hydralora"),  # the other methods under the same interface, each with a search of its own
    Arm("lily", "lily"),
]
CORE = ("lora", "effilora_k1.0", "effilora_k0.5", "effilora_k0.5_random", "effilora_k0.25", "effilora_k0.25_random",
        "effilora_k0.5_detach", "effilora_k0.5_prop")  # every seed of these first, seed by seed; then the rest
DEFAULT_ARMS = list(CORE)  # what the committed study ran; --arms adds grad_norm, revive, module
ARM_BY_NAME = {a.name: a for a in ARMS}

# (label, arm a, arm b): the paired differences a - b the issue asks for
QUESTIONS = [
    ("importance vs random, keep 0.5", "effilora_k0.5", "effilora_k0.5_random"),
    ("importance vs random, keep 0.25", "effilora_k0.25", "effilora_k0.25_random"),
    ("keep 0.5 vs keep 1.0", "effilora_k0.5", "effilora_k1.0"),
    ("keep 0.5 at its own rate vs keep 1.0", "effilora_k0.5_tuned", "effilora_k1.0"),
    ("keep 0.25 vs keep 1.0", "effilora_k0.25", "effilora_k1.0"),
    ("EffiLoRA keep 1.0 vs LoRA", "effilora_k1.0", "lora"),
    ("taylor vs grad_norm, keep 0.5", "effilora_k0.5", "effilora_k0.5_grad_norm"),
    ("proportional vs z-scored sampling, keep 0.5", "effilora_k0.5_prop", "effilora_k0.5"),
    ("proportional sampling vs random, keep 0.5", "effilora_k0.5_prop", "effilora_k0.5_random"),
    ("revive vs plain taylor, keep 0.5", "effilora_k0.5_revive", "effilora_k0.5"),
    ("module vs layer units, keep 0.5", "effilora_k0.5_module", "effilora_k0.5"),
    ("detach vs plain, keep 0.5", "effilora_k0.5_detach", "effilora_k0.5"),
    ("detach keep 0.5 vs LoRA", "effilora_k0.5_detach", "lora"),
    ("HydraLoRA vs LoRA", "hydralora", "lora"),
    ("Lily vs LoRA", "lily", "lora"),
    ("EffiLoRA keep 1.0 vs HydraLoRA", "effilora_k1.0", "hydralora"),
    ("EffiLoRA keep 1.0 vs Lily", "effilora_k1.0", "lily"),
    ("keep 0.5 vs Lily", "effilora_k0.5", "lily"),
]


@dataclass
class Study(q1.Study):
    """quality.py's settings on the deep base, five paired seeds, a record of every run's dynamics."""

    model_path: str = str(DEEP)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    lrs: list[float] = field(default_factory=lambda: [2.5e-3, 5e-3, 1e-2, 2e-2])
    ema_every: int = 25  # EMA snapshot period, optimizer steps
    flop_draws: int = 4  # seeded selections averaged by the FLOP count of a selective arm
    eval_at: list[int] = field(default_factory=list)  # optimizer steps with a test + validation point (round 3)
    choice: bool = True  # also score the listed answers teacher-forced (round 4, ``choice_scoring``)


# ---------------------------------------------------------------------------------------------- one run


def adapter_config(arm: Arm, study: Study, seed: int) -> Any:
    """Rank 8 on TARGETS, alpha 2 x rank; HydraLoRA and Lily with their defaults (4 B heads; 4 local A and
    4 global B, no scale), as in the first round."""
    from effilora_lightning import EffiLoRAConfig, HydraLoRAConfig, LilyConfig, LoRAConfig

    common = {"rank": study.rank, "target_modules": list(TARGETS), "seed": seed, "alpha": 2.0 * study.rank}
    if arm.kind == "lora":
        return LoRAConfig(**common)
    if arm.kind == "hydralora":
        return HydraLoRAConfig(**common)
    if arm.kind == "lily":
        return LilyConfig(**{k: v for k, v in common.items() if k != "alpha"})
    extra = {"detach_frozen": True} if arm.detach else {}  # only named when asked: runs before the option exists
    return EffiLoRAConfig(**common, **extra)


def reducer_args(arm: Arm, study: Study, seed: int) -> dict[str, Any] | None:
    if arm.kind != "effilora":
        return None
    return {"keep_ratio": arm.keep_ratio, "warmup_steps": study.reducer_warmup_steps, "seed": seed, "heatmap": False,
            "importance": arm.importance, "selection": arm.selection, "granularity": arm.granularity}


class ReviveTracker:
    """Mixin over the Reducer's ImportanceTracker: after the usual EMA update, each frozen unit's score is
    multiplied by 1 / ema_beta, capped at the highest score of the units observed this step."""

    def update(self, scores: torch.Tensor, observed: Any) -> None:
        super().update(scores, observed)  # type: ignore[misc]
        obs = torch.as_tensor(list(observed), dtype=torch.bool)
        if obs.all() or not obs.any():
            return
        ceiling = self.ema[obs].max()
        grown = torch.minimum(self.ema / self.ema_beta, ceiling)
        self.ema = torch.where(obs, self.ema, torch.maximum(self.ema, grown))


class ProportionalTracker:
    """Mixin over the Reducer's ImportanceTracker: sampling probabilities proportional to score^(1/T) instead of
    softmax(z-scored score / T). The z-score stretches any spread to unit variance, so scores 15 % apart are
    sampled 10:1; in proportion, they are sampled 1.15:1, and a unit must score several times its peers to
    dominate."""

    def sample_probs(self, temperature: float) -> torch.Tensor:
        w = self.ema.clamp_min(0.0) ** (1.0 / temperature)
        if not float(w.sum()) > 0:
            return torch.full_like(self.ema, 1.0 / self.ema.numel())
        return w / w.sum()


def _revive(tracker: Any) -> None:
    """Give one live tracker the revive rule (its class gains the mixin; its state is untouched)."""
    _mix(tracker, ReviveTracker)


def _mix(tracker: Any, mixin: type) -> None:
    base = type(tracker)
    if not issubclass(base, mixin):
        tracker.__class__ = type(f"{mixin.__name__[:-7]}{base.__name__}", (mixin, base), {})


def _recorder(arm: Arm, study: Study) -> Any:
    import lightning.pytorch as pl

    class Recorder(pl.Callback):
        """Training loss every step; EMA scores every ``ema_every`` steps; the revive rule, when asked."""

        def __init__(self) -> None:
            self.losses: list[float] = []
            self.ema: list[list[float]] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            tracker = pl_module.reducer.tracker if pl_module.reducer is not None else None
            if tracker is not None and arm.revive:
                _mix(tracker, ReviveTracker)
            if tracker is not None and arm.proportional:
                _mix(tracker, ProportionalTracker)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.losses.append(float(outputs["loss"]))
            cb = pl_module.reducer
            if cb is not None and cb.tracker is not None and trainer.global_step % study.ema_every == 0:
                self.ema.append([float(v) for v in cb.tracker.ema])

    return Recorder()


def _evaluator(study: Study, dm: Any, seed: int) -> Any:
    import lightning.pytorch as pl

    class Evaluator(pl.Callback):
        """At each ``study.eval_at`` step before the last: validation loss and the same greedy test, in place.

        The global RNG states are restored afterwards and the module goes back to train mode, so the rest of
        the run (data order, Reducer draws, dropout) is the run without evaluation points."""

        def __init__(self) -> None:
            self.points: list[dict[str, Any]] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            step = trainer.global_step
            if step in study.eval_at and step < study.steps and all(p["step"] != step for p in self.points):
                states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
                pl_module.eval()
                with torch.no_grad():
                    self.points.append({"step": step, "val_loss": _val_loss(pl_module, dm),
                                        "accuracy": _test_accuracy(pl_module, dm),
                                        **choice_metrics(pl_module, study, seed, dm)})
                pl_module.train()
                random.setstate(states[0])
                np.random.set_state(states[1])
                torch.set_rng_state(states[2])

    return Evaluator()


def _val_loss(module: Any, dm: Any) -> float:
    """Mean loss over the validation split, weighted by batch size (as Lightning's epoch mean of val_loss)."""
    total, n = 0.0, 0
    for batch in dm.val_dataloader()[0]:
        size = batch["input_ids"].shape[0]
        total += float(module._lm_loss(batch)) * size
        n += size
    return total / n


def _test_accuracy(module: Any, dm: Any) -> dict[str, float]:
    dm.setup("test")
    for batch in dm.test_dataloader():
        module.score(batch, module.test_accuracy)
    results = module.test_accuracy.compute()
    module.test_accuracy.reset()
    return {k: float(v) for k, v in results.items()}


_VAL_RECORDS: dict[tuple[str, int, int], list[dict[str, str]]] = {}  # per process


def val_records(study: Study, seed: int) -> list[dict[str, str]]:
    """The validation split's records, as CommonsenseDataModule splits them off the training file for ``seed``."""
    from effilora_lightning.data.commonsense_examples import load_records
    from effilora_lightning.data.split import seeded_split

    key = (study.data_path, study.val_set_size, seed)
    if key not in _VAL_RECORDS:
        records, _ = load_records(Path(study.data_path), ("instruction", "output", "answer"), "error")
        held = seeded_split(len(records), study.val_set_size, seed).held_out
        _VAL_RECORDS[key] = [records[i][1] for i in held]
    return _VAL_RECORDS[key]


def choice_metrics(module: Any, study: Study, seed: int, dm: Any) -> dict[str, Any]:
    """Teacher-forced choice accuracy on the test sets, the answer-token loss on the validation split and the
    validation loss per response token (``choice_scoring``: what greedy generation on the tiny bases cannot
    show); {} when ``study.choice`` is off."""
    if not study.choice:
        return {}
    return model_choice_metrics(module.model, module.require_tokenizer(), study, seed, dm)


def model_choice_metrics(model: Any, tok: Any, study: Study, seed: int, dm: Any) -> dict[str, Any]:
    from effilora_lightning.data.commonsense_prompts import TASKS, build_train_prompt

    records, val_loader = val_records(study, seed), dm.val_dataloader()[0]
    if len(records) != len(val_loader.dataset):  # val_records re-derives the DataModule's split: check it agrees
        raise RuntimeError(f"val_records found {len(records)} validation records, the DataModule "
                           f"{len(val_loader.dataset)}: the split rule changed, update val_records")
    with torch.no_grad():
        acc = choice_scoring.choice_accuracy(model, tok, study.dataset_dir, TASKS, build_train_prompt,
                                             study.max_test_samples_per_task)
        loss = choice_scoring.answer_loss(model, tok, records, build_train_prompt)
        by_offset = choice_scoring.loss_by_offset(model, val_loader)
    return {"choice_accuracy": acc, "val_answer_loss": loss, "val_loss_by_offset": by_offset}


def base_metrics(study: Study, seed: int) -> dict[str, Any]:
    """The same three figures for the base model without an adapter (the split of ``seed``)."""
    from transformers import AutoModelForCausalLM

    dm = q1.datamodule(study, seed)
    model = AutoModelForCausalLM.from_pretrained(study.model_path).eval()
    return model_choice_metrics(model, dm.tokenizer, study, seed, dm)


def selection_loss(runs: list[dict[str, Any]]) -> str:
    """The key the lr search compares: the answer-token loss where every run has it, else the response loss."""
    return "val_answer_loss" if runs and all("val_answer_loss" in r for r in runs) else "val_loss"


def best_lr(runs: list[dict[str, Any]], name: str, seed: int) -> float:
    """The rate of ``name``'s run on ``seed`` with the lowest ``selection_loss``."""
    mine = [r for r in runs if r["method"] == name and r["seed"] == seed]
    key = selection_loss(mine)
    return min(mine, key=lambda r: r[key])["lr"]


def selection_record(module: Any) -> dict[str, Any]:
    """Which units trained each step (bit masks), per-unit counts after the warm-up, final |B| per unit."""
    cb = module.reducer
    if cb is None or not cb.history:
        return {}
    hist = torch.stack(cb.history)  # (steps, U) bool
    units = cb.units
    b_norm = torch.zeros(units.num_units, dtype=torch.float64)
    for p, u in zip(units.params, units.unit_of_param.tolist()):
        b_norm[u] += float(p.detach().double().pow(2).sum())
    bits = (hist.long() * (2 ** torch.arange(hist.shape[1]))).sum(1) if hist.shape[1] <= 62 else None
    return {"unit_names": list(units.names), "masks": bits.tolist() if bits is not None else None,
            "counts_after_warmup": hist[module.reducer.reducer.warmup_steps:].sum(0).tolist(),
            "b_norm": b_norm.sqrt().tolist(), "final_ema": [float(v) for v in cb.tracker.ema]}


def optimizer_state_bytes(trainer: Any) -> int:
    return sum(t.numel() * t.element_size() for opt in trainer.optimizers for s in opt.state.values()
               for t in s.values() if torch.is_tensor(t) and t.dim() > 0)


def run_one(arm: Arm, study: Study, seed: int, lr: float, dm: Any) -> dict[str, Any]:
    """Fit and test one (arm, seed, learning rate); returns its row with the run's dynamics."""
    module = q1.seeded_module(adapter_config(arm, study, seed), reducer_args(arm, study, seed), study, seed, lr)
    rec, ev = _recorder(arm, study), _evaluator(study, dm, seed)
    with tempfile.TemporaryDirectory() as root, contextlib.redirect_stdout(io.StringIO()):
        tr = q1.trainer(study, root)
        tr.callbacks += [rec, ev] if study.eval_at else [rec]
        t0 = time.perf_counter()
        tr.fit(module, datamodule=dm)
        t1 = time.perf_counter()
        val_loss = float(tr.callback_metrics["val_loss"])
        state_bytes = optimizer_state_bytes(tr)
        tr.test(module, datamodule=dm, verbose=False)
        t2 = time.perf_counter()
        choice = choice_metrics(module, study, seed, dm)
    return {"method": arm.name, "seed": seed, "lr": lr, "val_loss": val_loss, "accuracy": module.test_results, **choice,
            "trainable": module.adapter_report.trainable, "updated_per_step": q1.updated_per_step(module),
            "optimizer_state_bytes": state_bytes, "fit_s": t1 - t0, "test_s": t2 - t1, "choice_s": time.perf_counter() - t2,
            "train_loss": rec.losses, "ema": rec.ema, "selection": selection_record(module),
            **({"curve": [*ev.points, {"step": study.steps, "val_loss": val_loss, "accuracy": module.test_results,
                                       **choice}]}
               if study.eval_at else {})}


_DATA: dict[int, Any] = {}  # seed -> tokenized datamodule, per process


def run_cached(study: Study, arm: Arm, seed: int, lr: float) -> dict[str, Any]:
    if seed not in _DATA:
        _DATA[seed] = q1.datamodule(study, seed)
    return run_one(arm, study, seed, lr, _DATA[seed])


def run_many(tasks: list[tuple[Arm, int, float]], study: Study, jobs: int, log: Any,
             sink: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run (arm, seed, lr) tasks; every finished row is appended to ``sink`` at once (partial results survive)."""
    out: list[dict[str, Any]] = []
    if jobs == 1:
        for task in tasks:
            out.append(run_cached(study, *task))
            sink.append(out[-1])
            log(q1._line(out[-1]))
        return out
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=q1._init_worker) as pool:
        futures = [pool.submit(run_cached, study, *task) for task in tasks]
        for future in as_completed(futures):
            out.append(future.result())
            sink.append(out[-1])
            log(q1._line(out[-1]))
    return out


def run_study(study: Study, arms: list[Arm], jobs: int, log: Any, sink: list[dict[str, Any]],
              chosen: dict[str, float] | None = None, later: tuple[str, ...] = ()) -> None:
    """Learning-rate search on the first seed for the arms without ``lr_from`` (skipped for an arm whose rate
    ``chosen`` already gives); then, seed by seed in arm order, every other run at its arm's chosen rate.
    Runs already in ``sink`` (``--resume``) are not run again."""
    first = study.seeds[0]
    chosen = dict(chosen or {})
    searched = [a for a in arms if a.lr_from is None and a.name not in chosen]
    prior = {(r["method"], r["seed"], r["lr"]): r for r in sink}
    todo = [(a, first, lr) for a in searched for lr in study.lrs if (a.name, first, lr) not in prior]
    runs = [r for r in prior.values() if r["seed"] == first] + run_many(todo, study, jobs, log, sink)
    chosen.update({a.name: best_lr(runs, a.name, first) for a in searched})
    for a in arms:
        if a.lr_from is not None and a.name not in chosen:
            if a.lr_from not in chosen:
                raise ValueError(f"{a.name} runs at {a.lr_from}'s rate: run {a.lr_from} too, or pass --chosen-lrs.")
            chosen[a.name] = chosen[a.lr_from]
    log("chosen learning rates: " + ", ".join(f"{k} {v:.0e}" for k, v in chosen.items()))
    done = {(r["method"], r["seed"], r["lr"]) for r in [*runs, *prior.values()]}
    core = [a for a in arms if a.name in CORE and a.name not in later]
    extra = [a for a in arms if a not in core]
    order = [(a, s) for s in study.seeds for a in core] + [(a, s) for s in study.seeds for a in extra]
    rest = [(a, s, chosen[a.name]) for a, s in order if (a.name, s, chosen[a.name]) not in done]
    run_many(rest, study, jobs, log, sink)


# ---------------------------------------------------------------------------------------------- statistics

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}


def t975(df: int) -> float:
    """Two-sided 95 % Student t quantile (table; the next lower tabulated df beyond 15, conservative)."""
    if df in _T975:
        return _T975[df]
    return _T975[max(k for k in _T975 if k <= df)] if df > 0 else math.nan


def interval(values: list[float]) -> dict[str, Any]:
    """Mean and 95 % t-interval of the mean."""
    n = len(values)
    mean = statistics.mean(values)
    if n < 2:
        return {"mean": mean, "ci95": [math.nan, math.nan], "n": n, "std": 0.0}
    sd = statistics.stdev(values)
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n, "std": sd}


def chosen_runs(runs: list[dict[str, Any]], name: str, first_seed: int) -> dict[int, dict[str, Any]]:
    """seed -> the run of ``name`` at its chosen learning rate."""
    mine = [r for r in runs if r["method"] == name]
    if not any(r["seed"] == first_seed for r in mine):
        return {}
    lr = best_lr(mine, name, first_seed)
    return {r["seed"]: r for r in mine if r["lr"] == lr}


def summarise(runs: list[dict[str, Any]], first_seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-arm rows (mean, 95 % interval) and the paired differences of QUESTIONS."""
    names = [a.name for a in ARMS if any(r["method"] == a.name for r in runs)]
    chosen = {n: chosen_runs(runs, n, first_seed) for n in names}
    rows = []
    for n in names:
        by_seed = chosen[n]
        if not by_seed:
            continue
        seeds = sorted(by_seed)
        acc = [100 * by_seed[s]["accuracy"]["average"] for s in seeds]
        any_run = by_seed[seeds[0]]
        rows.append({"method": n, "lr": any_run["lr"], "seeds": seeds, "per_seed": acc, "accuracy": interval(acc),
                     "val_loss": interval([by_seed[s]["val_loss"] for s in seeds]),
                     **_choice_row([by_seed[s] for s in seeds]),
                     "trainable": any_run["trainable"],
                     "updated_per_step": statistics.mean(by_seed[s]["updated_per_step"] for s in seeds),
                     "optimizer_state_bytes": max(by_seed[s]["optimizer_state_bytes"] for s in seeds),
                     "fit_s": statistics.mean(by_seed[s]["fit_s"] for s in seeds)})
    diffs = []
    for label, a, b in QUESTIONS:
        if a not in chosen or b not in chosen:
            continue
        seeds = sorted(set(chosen[a]) & set(chosen[b]))
        if len(seeds) < 2:
            continue
        d = [100 * (chosen[a][s]["accuracy"]["average"] - chosen[b][s]["accuracy"]["average"]) for s in seeds]
        v = [chosen[a][s]["val_loss"] - chosen[b][s]["val_loss"] for s in seeds]
        diffs.append({"question": label, "a": a, "b": b, "seeds": seeds, "per_seed": d, **interval(d),
                      "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d), "val_loss": interval(v),
                      "val_loss_per_seed": v,
                      **_choice_diff([chosen[a][s] for s in seeds], [chosen[b][s] for s in seeds])})
    return rows, diffs


def _has_choice(runs: list[dict[str, Any]]) -> bool:
    return bool(runs) and all("choice_accuracy" in r for r in runs)


def _choice_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Choice accuracy (%) and answer-token loss of one arm's chosen runs, when they have them (round 4 on)."""
    if not _has_choice(runs):
        return {}
    acc = [100 * r["choice_accuracy"]["average"] for r in runs]
    offsets = [r["val_loss_by_offset"] for r in runs if "val_loss_by_offset" in r]
    return {"choice_per_seed": acc, "choice": interval(acc),
            "val_answer_loss": interval([r["val_answer_loss"] for r in runs]),
            **({"val_loss_by_offset": [statistics.mean(k) for k in zip(*offsets)]} if len(offsets) == len(runs) else {})}


def _choice_diff(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed-paired choice-accuracy difference (points) and answer-loss difference, when both arms have them."""
    if not (_has_choice(a) and _has_choice(b)):
        return {}
    d = [100 * (x["choice_accuracy"]["average"] - y["choice_accuracy"]["average"]) for x, y in zip(a, b)]
    v = [x["val_answer_loss"] - y["val_answer_loss"] for x, y in zip(a, b)]
    return {"choice": {**interval(d), "per_seed": d, "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d)},
            "val_answer_loss": {**interval(v), "per_seed": v}}


def _ci(s: dict[str, Any], fmt: str = ".1f") -> str:
    lo, hi = s["ci95"]
    return f"{s['mean']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def markdown_tables(rows: list[dict[str, Any]], diffs: list[dict[str, Any]], cost: dict[str, Any] | None) -> str:
    cost_rows = (cost or {}).get("rows", {})
    choice = all("choice" in r for r in rows) and bool(rows)
    head = ["arm", "lr", *(["choice % (95 % CI)", "per seed", "val answer loss"] if choice else []),
            "generation % (95 % CI)", "per seed", "val loss", "trainable", "updated / step",
            "AdamW state KiB", "adapter GFLOP / step", "x LoRA's adapter FLOPs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = cost_rows.get(r["method"], {})
        first = [_ci(r["choice"]), ", ".join(f"{v:.1f}" for v in r["choice_per_seed"]),
                 _ci(r["val_answer_loss"], ".3f")] if choice else []
        cells = [r["method"], f"{r['lr']:.0e}", *first, _ci(r["accuracy"]), ", ".join(f"{v:.1f}" for v in r["per_seed"]),
                 _ci(r["val_loss"], ".3f"), f"{r['trainable']:,}", f"{r['updated_per_step']:,.0f}",
                 f"{r['optimizer_state_bytes'] / 1024:.0f}",
                 f"{c['adapter_flops'] / 1e9:.3f}" if c else "-", f"{c['adapter_flops_vs_lora']:.2f}" if c else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    choice = all("choice" in d for d in diffs) and bool(diffs)
    extra = ["choice, points [95 % CI]", "per seed", "wins / losses", "answer loss [95 % CI]"] if choice else []
    head = ["paired difference a - b", "n", *extra, "generation, points [95 % CI]", "per seed", "a wins / loses",
            "validation loss [95 % CI]"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in diffs:
        c = d.get("choice")
        first = [_ci(c), ", ".join(f"{v:+.1f}" for v in c["per_seed"]), f"{c['wins']} / {c['losses']}",
                 _ci(d["val_answer_loss"], "+.3f")] if choice else []
        cells = [f"{d['question']} ({d['a']} - {d['b']})", str(len(d["seeds"])), *first, _ci(d),
                 ", ".join(f"{v:+.1f}" for v in d["per_seed"]), f"{d['wins']} / {d['losses']}",
                 _ci(d["val_loss"], "+.3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- collapse analysis


def dynamics(run: dict[str, Any], warmup: int, plateau: float) -> dict[str, Any]:
    """What one run did: when its training loss left the plateau, how concentrated its selection was."""
    losses = run["train_loss"]
    smooth = [statistics.mean(losses[max(0, i - 9): i + 1]) for i in range(len(losses))]
    left = next((i for i, v in enumerate(smooth) if v < plateau), None)
    out: dict[str, Any] = {"method": run["method"], "seed": run["seed"], "lr": run["lr"],
                           "accuracy": 100 * run["accuracy"]["average"], "val_loss": run["val_loss"],
                           "left_plateau_step": left, "final_train_loss": smooth[-1] if smooth else None}
    sel = run.get("selection") or {}
    if sel.get("counts_after_warmup"):
        counts = sel["counts_after_warmup"]
        steps = len(losses) - warmup
        k = round(sum(counts) / max(steps, 1))
        top = sorted(counts, reverse=True)[:k]
        out.update({"top_k_share": sum(top) / max(sum(counts), 1), "never_trained_after_warmup": sum(c == 0 for c in counts),
                    "counts": counts, "b_norm": sel["b_norm"], "churn": _churn(sel.get("masks"), warmup)})
    return out


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return None
    return statistics.correlation(xs, ys)


def collapse_summary(dyn: list[dict[str, Any]], rows: list[dict[str, Any]], low: float) -> dict[str, Any]:
    """Per arm (its chosen-rate runs): how many runs ended below ``low`` %, when the loss left the plateau, how
    concentrated the selection was; and across the selective arms' runs, what accuracy went with."""
    chosen = {(r["method"], s): r["lr"] for r in rows for s in r["seeds"]}
    mine = [d for d in dyn if chosen.get((d["method"], d["seed"])) == d["lr"]]
    per_arm = {}
    for r in rows:
        ds = [d for d in mine if d["method"] == r["method"]]
        left = [d["left_plateau_step"] for d in ds if d["left_plateau_step"] is not None]
        entry = {"below_low": sum(d["accuracy"] < low for d in ds), "runs": len(ds),
                 "left_plateau_step": left, "never_left": sum(d["left_plateau_step"] is None for d in ds)}
        for key in ("top_k_share", "never_trained_after_warmup", "churn"):
            vals = [d[key] for d in ds if d.get(key) is not None]
            entry[key] = statistics.mean(vals) if vals else None
        per_arm[r["method"]] = entry
    sel = [d for d in mine if d.get("top_k_share") is not None and d.get("churn") is not None]
    acc = [d["accuracy"] for d in sel]
    return {"low": low, "per_arm": per_arm, "selective_runs": len(sel),
            "corr_accuracy_top_k_share": _pearson(acc, [d["top_k_share"] for d in sel]),
            "corr_accuracy_churn": _pearson(acc, [d["churn"] for d in sel]),
            "corr_accuracy_final_train_loss": _pearson([d["accuracy"] for d in mine],
                                                        [d["final_train_loss"] for d in mine])}


def _churn(masks: list[int] | None, warmup: int) -> float | None:
    """Mean units swapped in per step after the warm-up."""
    if not masks or len(masks) <= warmup + 1:
        return None
    after = masks[warmup:]
    return statistics.mean(bin(b & ~a).count("1") for a, b in zip(after, after[1:]))


# ---------------------------------------------------------------------------------------------- cost: FLOPs, timing


def _batch(study: Study) -> dict[str, torch.Tensor]:
    dm = q1.datamodule(study, study.seeds[0])
    batch = next(iter(dm.train_dataloader()))
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}


def _floor_model(study: Study) -> Any:
    """The frozen base with gradients through activations only (what every adapter's backward needs)."""
    from transformers import AutoModelForCausalLM

    from effilora_lightning.losses import install_chunked_loss_head

    model = AutoModelForCausalLM.from_pretrained(study.model_path, local_files_only=True, dtype=torch.float32)
    model.train().requires_grad_(False)
    install_chunked_loss_head(model, 1024)
    model.enable_input_require_grads()
    return model


def _arm_module(arm: Arm, study: Study, seed: int = 0) -> Any:
    from effilora_lightning import CausalLMModule

    module = CausalLMModule(adapter=adapter_config(arm, study, seed), model_path=study.model_path, reducer=None)
    module.configure_model()
    return module


def _loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from effilora_lightning.losses import find_loss_head

    with find_loss_head(model).computing_loss(batch["labels"]):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _selections(arm: Arm, model: Any, draws: int) -> tuple[Any, list[torch.Tensor]]:
    """The arm's units and ``draws`` seeded selections of K of them (all units for keep 1.0 and LoRA)."""
    if arm.kind != "effilora":
        return None, [None]
    from effilora_lightning.selection import effilora_units
    from effilora_lightning.selection.reducer import num_kept

    units = effilora_units(model, arm.granularity)
    k = num_kept(arm.keep_ratio, units.num_units)
    if k == units.num_units:
        return units, [torch.ones(units.num_units, dtype=torch.bool)]
    gen = torch.Generator().manual_seed(0)
    masks = []
    for _ in range(draws):
        m = torch.zeros(units.num_units, dtype=torch.bool)
        m[torch.randperm(units.num_units, generator=gen)[:k]] = True
        masks.append(m)
    return units, masks


def count_flops(model: Any, batch: dict[str, torch.Tensor]) -> float:
    """FLOPs of one forward + backward, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        _loss(model, batch).backward()
    return float(counter.get_total_flops())


def cost_study(study: Study, arms: list[Arm]) -> dict[str, Any]:
    """Counted FLOPs of one training step for the floor and every arm (mean over the arm's selections):

    * ``step_flops``: the step as it trains. A frozen, detached layer below every selected one needs no
      backward through the base either, so this can fall below floor + adapter.
    * ``adapter_flops``: the step with gradients forced through the base down to the embeddings (as the floor
      does), minus the floor: what the adapter itself adds.
    """
    batch = _batch(study)
    positions = int(batch["input_ids"].numel())
    floor = count_flops(_floor_model(study), batch)
    rows: dict[str, Any] = {}
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}  # arms that differ only in how B are picked cost the same
    for arm in arms:
        key = (arm.kind, arm.keep_ratio, arm.granularity, arm.detach)
        if key in seen:
            rows[arm.name] = dict(seen[key])
            continue
        model = _arm_module(arm, study).model
        units, masks = _selections(arm, model, study.flop_draws)
        natural, forced = [], []
        for mask in masks:
            if units is not None:
                units.set_trainable(mask)
            natural.append(count_flops(model, batch))
            model.enable_input_require_grads()
            forced.append(count_flops(model, batch))
            model.disable_input_require_grads()
        adapter = statistics.mean(forced) - floor
        rows[arm.name] = {"step_flops": statistics.mean(natural), "adapter_flops": adapter,
                          "adapter_flops_per_position": adapter / positions, "draws": len(masks)}
        seen[key] = rows[arm.name]
    lora = rows.get("lora", {})
    for r in rows.values():
        r["adapter_flops_vs_lora"] = r["adapter_flops"] / lora["adapter_flops"] if lora else None
        r["step_flops_vs_lora"] = r["step_flops"] / lora["step_flops"] if lora else None
    return {"floor_step_flops": floor, "positions": positions, "batch_shape": list(batch["input_ids"].shape),
            "rows": rows}


class _Stepper:
    """One arm ready to step as the product trains: AdamW over every adapter parameter, the Reducer for EffiLoRA."""

    def __init__(self, arm: Arm | None, study: Study) -> None:
        from effilora_lightning import adapter_parameters

        self.arm = arm
        self.reducer = None
        self.step_index = 0
        if arm is None:
            self.model, self.opt = _floor_model(study), None
            return
        module = _arm_module(arm, study)
        self.model = module.model
        self.opt = torch.optim.AdamW(adapter_parameters(module), lr=1e-3, foreach=False)  # as its runs (quality.py)
        if arm.kind == "effilora" and arm.keep_ratio < 1.0:
            from effilora_lightning.selection import Reducer, effilora_units

            args = reducer_args(arm, study, 0)
            self.reducer = Reducer(effilora_units(self.model, arm.granularity), keep_ratio=arm.keep_ratio,
                                   importance=args["importance"], selection=args["selection"], warmup_steps=0, seed=0)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        if self.reducer is not None:
            self.reducer.begin_step()
        loss = _loss(self.model, batch)
        loss.backward()
        if self.reducer is not None:
            self.reducer.end_step(self.step_index)
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.step_index += 1


def timing_study(study: Study, arms: list[Arm], rounds: int, steps: int, log: Any) -> dict[str, Any]:
    """Per round: every arm and the floor, shuffled; each arm's median step / the floor's median step."""
    batch = _batch(study)
    steppers = {"floor": _Stepper(None, study), **{a.name: _Stepper(a, study) for a in arms}}
    for s in steppers.values():
        s.step(batch)  # warm caches and AdamW state
    rng = random.Random(0)
    ratios: dict[str, list[float]] = {a.name: [] for a in arms}
    floors = []
    for r in range(rounds):
        order = list(steppers)
        rng.shuffle(order)
        med = {}
        for name in order:
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                steppers[name].step(batch)
                times.append(time.perf_counter() - t0)
            med[name] = statistics.median(times)
        floors.append(med["floor"])
        for a in arms:
            ratios[a.name].append(med[a.name] / med["floor"])
        log(f"timing round {r + 1}/{rounds}: floor {1e3 * med['floor']:.0f} ms; "
            + ", ".join(f"{a.name} {ratios[a.name][-1]:.3f}" for a in arms))
    out = {n: {"vs_floor": interval(v), "per_round": v} for n, v in ratios.items()}
    lora = ratios.get("lora")
    for n, v in ratios.items():  # overhead over the floor relative to LoRA's, paired per round
        if lora:
            rel = [(x - 1) / (y - 1) for x, y in zip(v, lora) if y > 1]
            out[n]["overhead_vs_lora"] = interval(rel) if len(rel) > 1 else None
    return {"rounds": rounds, "steps_per_round": steps, "floor_median_s": floors, "rows": out,
            "loadavg": os.getloadavg()}


# ---------------------------------------------------------------------------------------------- report


def load_runs(paths: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    payloads = [json.loads(Path(p).read_text()) for p in paths]
    runs = [r for p in payloads for r in p["runs"]]
    return runs, payloads


def report(paths: list[str], out_json: str | None, plot: str | None, study: Study, log: Any,
           timing: dict[str, Any] | None, cost_from: str | None = None) -> dict[str, Any]:
    runs, payloads = load_runs(paths)
    first = payloads[0]["study"]["seeds"][0]
    rows, diffs = summarise(runs, first)
    arms = [ARM_BY_NAME[r["method"]] for r in rows]
    if cost_from:  # counts are deterministic: reuse an earlier report's (it must cover these arms)
        cost = json.loads(Path(cost_from).read_text())["cost"]
        missing = [a.name for a in arms if a.name not in cost["rows"]]
        if missing:
            raise ValueError(f"{cost_from} has no FLOP count for {missing}: run --report without --cost.")
    else:
        log("counting FLOPs ...")
        cost = cost_study(study, arms)
    plateau = collapse_threshold(runs) if any(len(r["train_loss"]) >= 125 for r in runs) else math.inf
    warm = payloads[0]["study"]["reducer_warmup_steps"]
    dyn = [dynamics(r, warm, plateau) for r in runs]
    collapse = collapse_summary(dyn, rows, low=50.0)
    print(markdown_tables(rows, diffs, cost))
    base = base_metrics(study, first) if any("choice" in r for r in rows) else None
    if base is not None:
        log(f"base model, no adapter: choice {100 * base['choice_accuracy']['average']:.1f} %, answer loss "
            f"{base['val_answer_loss']:.3f}, loss per response token {[round(x, 2) for x in base['val_loss_by_offset']]}")
    at_step = curve_summaries(runs, first)
    for step, entry in at_step.items():
        print(f"\n### at optimizer step {step}\n\n" + markdown_tables(entry["rows"], entry["differences"], cost))
    result = {"sources": [{"path": p, "git": pl.get("git"), "seconds": pl.get("seconds")} for p, pl in zip(paths, payloads)],
              "study": payloads[0]["study"], "rows": rows, "differences": diffs, "cost": cost, "timing": timing,
              "plateau_loss": plateau, "collapse": collapse, "dynamics": dyn, "at_step": at_step, "base": base}
    if out_json:
        Path(out_json).write_text(json.dumps(result, indent=2))
    if plot:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import plots

        plots.plot_frontier(result, Path(plot))
    return result


_POINT_KEYS = ("choice_accuracy", "val_answer_loss", "val_loss_by_offset")  # a curve point's own, when it has them


def curve_summaries(runs: list[dict[str, Any]], first_seed: int) -> dict[int, dict[str, Any]]:
    """Per ``--eval-at`` step: the rows and paired differences of the runs as they stood at that step (runs
    without a curve, e.g. round 2's, have none), each arm at the rate chosen at the end of the run (an
    earlier point is a look inside the chosen run, not a search of its own)."""
    steps = sorted({p["step"] for r in runs for p in r.get("curve", [])})
    final = {n: best_lr(runs, n, first_seed) for n in {r["method"] for r in runs}
             if any(r["method"] == n and r["seed"] == first_seed for r in runs)}
    out = {}
    for step in steps:
        view = [{k: v for k, v in r.items() if k not in _POINT_KEYS} | p
                for r in runs if r["lr"] == final.get(r["method"]) for p in r.get("curve", []) if p["step"] == step]
        rows, diffs = summarise(view, first_seed)
        out[step] = {"rows": rows, "differences": diffs}
    return out


def collapse_threshold(runs: list[dict[str, Any]]) -> float:
    """Training loss (10-step mean) that marks 'left the plateau': 0.03 below the plateau every run reaches
    after learning the answer format, taken as the median over runs of the mean loss of steps 75-125."""
    plateau = statistics.median(statistics.mean(r["train_loss"][75:125]) for r in runs if len(r["train_loss"]) >= 125)
    return plateau - 0.03


# ---------------------------------------------------------------------------------------------- command line


def git_state() -> dict[str, Any]:
    """The commit, the package's uncommitted paths, and a hash of the package the runs import (which may be a
    frozen copy of the working tree, via PYTHONPATH, so that edits made during a long run do not reach it)."""
    import hashlib

    import effilora_lightning

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    pkg = Path(effilora_lightning.__file__).resolve().parent
    digest = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        digest.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes())
    return {"commit": git("rev-parse", "HEAD"), "dirty_paths": git("status", "--porcelain", "effilora_lightning").splitlines(),
            "package_dir": str(pkg), "package_py_sha256": digest.hexdigest(),
            "detach_frozen_in_adapter": "detach_frozen" in (pkg / "adapters/effilora.py").read_text()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=None, choices=list(ARM_BY_NAME), metavar="ARM",
                    help="default: every arm but effilora_k0.5_detach when the adapter lacks detach_frozen")
    ap.add_argument("--later", nargs="+", default=[], metavar="ARM",
                    help="run these arms after every seed of the others, not seed by seed with them")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 3 4 (lr search on the first)")
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="default 2.5e-3 5e-3 1e-2 2e-2")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300)")
    ap.add_argument("--eval-at", type=int, nargs="+", default=None, metavar="STEP",
                    help="also test and validate at these optimizer steps (the last is --steps), one curve per run")
    ap.add_argument("--chosen-lrs", nargs="+", default=[], metavar="ARM=LR",
                    help="rates already chosen (by an earlier run of the same study): no search for these arms")
    ap.add_argument("--model-path", default=None, help="default data/checkpoints/tiny-llama-deep")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="4 arms, 1 seed, 1 lr, 3 steps, 2 test samples per task")
    ap.add_argument("--json", default=None, help="the runs (written after every run)")
    ap.add_argument("--resume", default=None, metavar="JSON", help="keep this file's runs; run only the missing ones")
    ap.add_argument("--report", nargs="+", default=None, metavar="JSON", help="summarise these runs' files")
    ap.add_argument("--report-json", default=None)
    ap.add_argument("--plot", default=None, help="frontier PNG (with --report)")
    ap.add_argument("--cost", default=None, metavar="JSON", help="with --report: reuse this report JSON's FLOP counts")
    ap.add_argument("--timing", type=int, default=0, metavar="ROUNDS", help="paired step-time rounds (with --report)")
    ap.add_argument("--timing-steps", type=int, default=5)
    return ap.parse_args(argv)


def study_from(args: argparse.Namespace) -> Study:
    study = Study()
    if args.smoke:
        study = Study(steps=3, warmup_steps=1, reducer_warmup_steps=1, val_set_size=16, max_test_samples_per_task=2,
                      max_new_tokens=4, lrs=[1e-2], seeds=[0], ema_every=1, flop_draws=2)
    for name in ("steps", "seeds", "lrs", "model_path", "eval_at"):
        if getattr(args, name) is not None:
            setattr(study, name, getattr(args, name))
    if study.eval_at and (max(study.eval_at) != study.steps or min(study.eval_at) < 1):
        raise ValueError(f"--eval-at {study.eval_at}: the steps must lie in 1..--steps and include --steps "
                         f"({study.steps}), the run's end")
    return study


def default_arms(args: argparse.Namespace) -> list[Arm]:
    if args.arms:
        return [ARM_BY_NAME[n] for n in args.arms]
    if args.smoke:
        return [ARM_BY_NAME[n] for n in ("lora", "effilora_k1.0", "effilora_k0.5", "effilora_k0.5_prop")]
    has_detach = git_state()["detach_frozen_in_adapter"]
    return [ARM_BY_NAME[n] for n in DEFAULT_ARMS if has_detach or not ARM_BY_NAME[n].detach]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    jobs = 1 if args.smoke else args.jobs
    torch.set_num_threads(1)
    q1._quiet()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    study = study_from(args)
    if not (Path(study.model_path) / "model.safetensors").is_file():
        raise FileNotFoundError(f"{study.model_path}/model.safetensors is missing: build it with "
                                "data/scripts/make_tiny_llama.py --layers 12 --hidden 48 --intermediate 128")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.report:
        timing = None
        if args.timing:
            timing = timing_study(study, [ARM_BY_NAME[r] for r in _report_arms(args.report)], args.timing,
                                  args.timing_steps, log)
        return report(args.report, args.report_json, args.plot, study, log, timing, args.cost)
    arms = default_arms(args)
    payload = {"study": asdict(study), "arms": [asdict(a) for a in arms], "git": git_state(),
               "data_sha256": q1.data_fingerprint(study), "targets": TARGETS, "jobs": jobs, "threads": 1,
               "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}
    started = time.time()

    def sink_write() -> None:
        payload["seconds"] = time.time() - started
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            Path(args.json).write_text(json.dumps(payload, indent=2))

    class _Sink(list):
        def append(self, row: dict[str, Any]) -> None:
            super().append(row)
            sink_write()

    payload["runs"] = _Sink()
    if args.resume:
        resumed = json.loads(Path(args.resume).read_text())
        payload["resumed_from"] = {"path": args.resume, "git": resumed.get("git"), "runs": len(resumed["runs"])}
        list.extend(payload["runs"], [r for r in resumed["runs"] if r["method"] in {a.name for a in arms}])
    chosen = {k: float(v) for k, v in (item.split("=", 1) for item in args.chosen_lrs)}
    payload["chosen_lrs_given"] = chosen
    run_study(study, arms, jobs, log, payload["runs"], chosen, tuple(args.later))
    payload["runs"] = list(payload["runs"])
    sink_write()
    rows, diffs = summarise(payload["runs"], study.seeds[0])
    print(markdown_tables(rows, diffs, None))
    return payload


def _report_arms(paths: list[str]) -> list[str]:
    runs, _ = load_runs(paths)
    return [a.name for a in ARMS if any(r["method"] == a.name for r in runs)]


if __name__ == "__main__":
    main()
