"""Quality study: every method fine-tunes the bundled tiny LLaMA on the commonsense tasks; accuracy per task.

    python benchmarks/quality.py --json benchmarks/results/quality.json      # full study, ~30 min on 2 cores
    python benchmarks/quality.py --smoke --json /tmp/quality_smoke.json      # every method, a few steps, < 60 s

Runs go to ``--jobs`` worker processes (default 2, one torch thread each: on a 2-core machine that beats one
process with 2 threads for a model this small); wall times are per run, with the other worker running beside it.

It drives the product's own path: ``CausalLMModule(adapter=..., model_path="data/checkpoints/tiny-llama", reducer=...)``
(which adds EffiLoRACallback itself for EffiLoRA), ``CommonsenseDataModule`` and ``lightning.Trainer`` on CPU.

Protocol (identical for every method):
  * Methods: LoRA; EffiLoRA at keep_ratio 1.0, 0.5 and 0.25, the last two with the Reducer's importance-based
    selection (taylor scores, sampled) and with random selection; HydraLoRA; Lily. All at rank 8 on
    q, k, v, up and down (the LLaMA-3 commonsense recipe's targets), each method's other defaults
    (HydraLoRA: 4 B heads; Lily: 4 local A, 4 global B, no scale). EffiLoRA: 10 Reducer warm-up steps.
  * Same optimizer steps, batch 16, cutoff 128, loss on the response only (as the demo config), schedule
    (10 warm-up steps, cosine) and learning-rate budget: each method
    tries every learning rate of ``--lrs`` with seed 0 and keeps the one with the lowest validation loss
    (a held-out split of the TRAINING file, never the test sets); the other seeds run at that rate only.
  * A seed fixes the data order and validation split, the adapter init and the Reducer's draws.
  * Test: greedy generation on every task's test set (first answer-pattern match, as the module scores it).
  * Reported per method: per-task and average accuracy over the seeds (mean and sample std), trainable
    parameters, parameters updated per optimizer step (EffiLoRA: shared A + the B actually selected, averaged
    over the steps), wall time of fit and test.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Method:
    """One row of the study: an adapter and, for EffiLoRA, the Reducer's settings."""

    name: str
    kind: str  # lora | effilora | hydralora | lily
    keep_ratio: float = 1.0
    selection: str = "importance"  # importance (taylor, sampled) | random


METHODS = [
    Method("lora", "lora"),
    Method("effilora_k1.0", "effilora", 1.0),
    Method("effilora_k0.5", "effilora", 0.5),
    Method("effilora_k0.5_random", "effilora", 0.5, "random"),
    Method("effilora_k0.25", "effilora", 0.25),
    Method("effilora_k0.25_random", "effilora", 0.25, "random"),
    Method("hydralora", "hydralora"),
    Method("lily", "lily"),
]


@dataclass
class Study:
    """Settings shared by every run."""

    model_path: str = str(ROOT / "data/checkpoints/tiny-llama")
    data_path: str = str(ROOT / "data/datasets/commonsense/commonsense_170k.json")
    dataset_dir: str = str(ROOT / "data/datasets/commonsense/dataset")
    rank: int = 8
    steps: int = 300  # the demo config's budget: the tiny base needs ~200 steps to leave chance
    batch_size: int = 16
    warmup_steps: int = 10
    reducer_warmup_steps: int = 10
    val_set_size: int = 64
    max_test_samples_per_task: int | None = None
    max_new_tokens: int = 8
    cutoff_len: int = 128
    train_on_inputs: bool = False  # loss on the response only, as the demo config: the format is learnt in dozens of steps
    lrs: list[float] = field(default_factory=lambda: [3e-3, 1e-2, 3e-2])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])


def adapter_config(method: Method, study: Study, seed: int) -> Any:
    from effilora_lightning import EffiLoRAConfig, HydraLoRAConfig, LilyConfig, LoRAConfig

    common = {"rank": study.rank, "target_modules": list(TARGETS), "seed": seed}
    alpha = 2.0 * study.rank
    if method.kind == "lora":
        return LoRAConfig(alpha=alpha, **common)
    if method.kind == "effilora":
        return EffiLoRAConfig(alpha=alpha, **common)
    if method.kind == "hydralora":
        return HydraLoRAConfig(alpha=alpha, **common)
    return LilyConfig(**common)


def reducer_args(method: Method, study: Study, seed: int) -> dict[str, Any] | None:
    if method.kind != "effilora":
        return None
    pick = {"importance": "taylor", "selection": "sample"} if method.selection == "importance" else \
        {"importance": "random", "selection": "random"}
    return {"keep_ratio": method.keep_ratio, "warmup_steps": study.reducer_warmup_steps, "seed": seed,
            "heatmap": False, **pick}


def datamodule(study: Study, seed: int) -> Any:
    from effilora_lightning import CommonsenseDataModule

    dm = CommonsenseDataModule(
        data_path=study.data_path, dataset_dir=study.dataset_dir, tokenizer_path=study.model_path,
        val_set_size=study.val_set_size, val_generation_samples_per_task=0, cutoff_len=study.cutoff_len,
        train_on_inputs=study.train_on_inputs,
        batch_size=study.batch_size, eval_batch_size=64, max_test_samples_per_task=study.max_test_samples_per_task,
        seed=seed,
    )
    dm.setup("fit")  # tokenize once per seed; later setup() calls reuse it
    return dm


def trainer(study: Study, root: str) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=study.steps, val_check_interval=study.steps,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )


def updated_per_step(module: Any) -> float:
    """Adapter parameters that received an update, averaged over optimizer steps."""
    total = module.adapter_report.trainable
    cb = module.reducer
    if cb is None or not cb.history:
        return float(total)
    b_all = int(cb.units.numel.sum())
    b_kept = torch.stack(cb.history).double() @ cb.units.numel.double()  # (steps,)
    return float(total - b_all + b_kept.mean())


def seeded_module(adapter: Any, reducer: dict[str, Any] | None, study: Study, seed: int, lr: float) -> Any:
    """The product's CausalLMModule for one run, after seeding everything with the run's seed."""
    import lightning.pytorch as pl

    from effilora_lightning import CausalLMModule

    pl.seed_everything(seed, verbose=False)
    # for_loop: the AdamW every published round ran (torch's CPU default before the modules chose fused), so that
    # a rerun reproduces BENCHMARKS.md's figures bit for bit
    return CausalLMModule(
        adapter=adapter, model_path=study.model_path, learning_rate=lr, warmup_steps=study.warmup_steps,
        scheduler="cosine", max_new_tokens=study.max_new_tokens, reducer=reducer, adamw_implementation="for_loop",
    )


def run_one(method: Method, study: Study, seed: int, lr: float, dm: Any) -> dict[str, Any]:
    """Fit and test one (method, seed, learning rate); returns its row."""
    module = seeded_module(adapter_config(method, study, seed), reducer_args(method, study, seed), study, seed, lr)
    with tempfile.TemporaryDirectory() as root, contextlib.redirect_stdout(io.StringIO()):
        tr = trainer(study, root)
        t0 = time.perf_counter()
        tr.fit(module, datamodule=dm)
        t1 = time.perf_counter()
        val_loss = float(tr.callback_metrics["val_loss"])
        tr.test(module, datamodule=dm, verbose=False)
        t2 = time.perf_counter()
    return {"method": method.name, "seed": seed, "lr": lr, "val_loss": val_loss, "accuracy": module.test_results,
            "trainable": module.adapter_report.trainable, "updated_per_step": updated_per_step(module),
            "fit_s": t1 - t0, "test_s": t2 - t1}


def run_study(study: Study, methods: list[Method], jobs: int, log: Any) -> list[dict[str, Any]]:
    """Learning-rate search on the first seed, then the remaining seeds at each method's chosen rate."""
    first = study.seeds[0]
    runs = run_many([(m, first, lr) for m in methods for lr in study.lrs], study, jobs, log)
    chosen = {m.name: best_lr(runs, m.name, first) for m in methods}
    return runs + run_many([(m, s, chosen[m.name]) for s in study.seeds[1:] for m in methods], study, jobs, log)


_DATA: dict[int, Any] = {}  # seed -> tokenized datamodule, per process


def run_cached(study: Study, method: Method, seed: int, lr: float) -> dict[str, Any]:
    if seed not in _DATA:
        _DATA[seed] = datamodule(study, seed)
    return run_one(method, study, seed, lr, _DATA[seed])


def run_many(tasks: list[tuple[Method, int, float]], study: Study, jobs: int, log: Any) -> list[dict[str, Any]]:
    """Run (method, seed, lr) tasks here (jobs = 1) or in ``jobs`` one-thread worker processes."""
    if jobs == 1:
        out = []
        for task in tasks:
            out.append(run_cached(study, *task))
            log(_line(out[-1]))
        return out
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker) as pool:
        futures = [pool.submit(run_cached, study, *task) for task in tasks]
        for future in as_completed(futures):
            log(_line(future.result()))
        return [f.result() for f in futures]


def _init_worker() -> None:
    torch.set_num_threads(1)
    _quiet()


def _quiet() -> None:
    """Keep the study's own log readable: no per-run Lightning banners, adapter reports or progress bars."""
    import logging

    from transformers.utils import logging as hf_logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def best_lr(runs: list[dict[str, Any]], method: str, seed: int) -> float:
    candidates = [r for r in runs if r["method"] == method and r["seed"] == seed]
    return min(candidates, key=lambda r: r["val_loss"])["lr"]


def _line(r: dict[str, Any]) -> str:
    return (f"{r['method']:<22} seed {r['seed']} lr {r['lr']:.0e}: val_loss {r['val_loss']:.3f} "
            f"avg acc {100 * r['accuracy']['average']:.1f} ({r['fit_s']:.0f}+{r['test_s']:.0f} s)")


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: list[dict[str, Any]], methods: list[Method], first_seed: int) -> list[dict[str, Any]]:
    rows = []
    for m in methods:
        lr = best_lr(runs, m.name, first_seed)
        chosen = [r for r in runs if r["method"] == m.name and r["lr"] == lr]
        tasks = list(chosen[0]["accuracy"])
        rows.append({
            "method": m.name, "lr": lr, "seeds": [r["seed"] for r in chosen],
            "accuracy": {t: _mean_std([r["accuracy"][t] for r in chosen]) for t in tasks},
            "trainable": chosen[0]["trainable"], "updated_per_step": statistics.mean(r["updated_per_step"] for r in chosen),
            "fit_s": statistics.mean(r["fit_s"] for r in chosen), "test_s": statistics.mean(r["test_s"] for r in chosen),
            "val_loss": _mean_std([r["val_loss"] for r in chosen]),
        })
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    tasks = [t for t in rows[0]["accuracy"] if t != "average"]
    head = ["method", "lr", *tasks, "average", "val loss", "trainable", "updated / step", "fit s", "test s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = [f"{100 * r['accuracy'][t]['mean']:.1f} ± {100 * r['accuracy'][t]['std']:.1f}" for t in [*tasks, "average"]]
        loss = f"{r['val_loss']['mean']:.3f} ± {r['val_loss']['std']:.3f}"
        cells = [r["method"], f"{r['lr']:.0e}", *acc, loss, f"{r['trainable']:,}", f"{r['updated_per_step']:,.0f}",
                 f"{r['fit_s']:.0f}", f"{r['test_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def data_fingerprint(study: Study) -> dict[str, str]:
    """sha256 (first 16 hex) of the base weights and the training file: which data a result belongs to."""
    files = [Path(study.model_path) / "model.safetensors", Path(study.data_path)]
    return {str(f.relative_to(ROOT)) if f.is_relative_to(ROOT) else str(f): hashlib.sha256(f.read_bytes()).hexdigest()[:16]
            for f in files}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (lr search on the first)")
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="learning-rate budget, default 3e-3 1e-2 3e-2")
    ap.add_argument("--methods", nargs="+", default=None, choices=[m.name for m in METHODS], metavar="METHOD")
    ap.add_argument("--max-test-samples-per-task", type=int, default=None, help="default: all")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each (1: in this process)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads when --jobs 1")
    ap.add_argument("--smoke", action="store_true",
                    help="every method, 1 seed, 1 lr, 3 steps, 2 test samples/task, in this process")
    ap.add_argument("--json", default=None, help="write settings, every run and the summary here")
    return ap.parse_args(argv)


def study_from(args: argparse.Namespace) -> Study:
    study = Study()
    if args.smoke:
        study = Study(steps=3, warmup_steps=1, reducer_warmup_steps=1, val_set_size=16, max_test_samples_per_task=2,
                      max_new_tokens=4, lrs=[1e-2], seeds=[0])
    for name in ("steps", "seeds", "lrs", "max_test_samples_per_task"):
        if getattr(args, name) is not None:
            setattr(study, name, getattr(args, name))
    return study


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    args.jobs = 1 if args.smoke else args.jobs
    torch.set_num_threads(args.threads)
    _quiet()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    study = study_from(args)
    if not (Path(study.model_path) / "model.safetensors").is_file():
        raise FileNotFoundError(f"{study.model_path}/model.safetensors is missing: build it with data/scripts/make_tiny_llama.py")
    methods = [m for m in METHODS if args.methods is None or m.name in args.methods]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    started = time.time()
    runs = run_study(study, methods, args.jobs, log)
    rows = summarise(runs, methods, study.seeds[0])
    print(markdown_table(rows))
    if args.json:
        payload = {"study": study.__dict__, "data_sha256": data_fingerprint(study), "targets": TARGETS, "jobs": args.jobs, "threads": 1 if args.jobs > 1 else args.threads, "torch": torch.__version__,
                   "seconds": time.time() - started, "rows": rows, "runs": runs}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
