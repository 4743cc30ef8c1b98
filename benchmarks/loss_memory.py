"""Peak memory and step time of one adapter training step with the chunked loss (CausalLMModule's default) and
with Hugging Face's plain ``labels=`` loss, on a model with LLaMA-3's 128,256-word vocabulary.

    python benchmarks/loss_memory.py --json benchmarks/results/loss_memory_cpu.json   # CPU default, ~10-15 min
    python benchmarks/loss_memory.py --smoke --json /tmp/loss_memory_smoke.json        # tiny model, seconds
    python benchmarks/loss_memory.py --device cuda --json loss_memory_h200.json       # GPU: LLaMA-3-8B widths, bf16

CPU default: LLaMA architecture with 2 layers, 512 wide (MLP 1792, 8 query heads over 2 key/value heads), the real
vocabulary (128,256, untied head), fp32; LoRA rank 16 on q, k, v, up, down; batch 4 x 512 tokens, every label
counts (no masked prompt, which would favour the chunked path: it skips rows that do not count).
A step = ``CausalLMModule.training_step`` (the product's loss path) + backward + AdamW step.

Variants:
  * ``plain``: ``chunked_loss=False``, HF's loss on the full (tokens x vocab) logits.
  * ``chunked``: the default, chunks of ``loss_chunk_size`` tokens, gradients computed while each chunk is at hand.
  * ``chunked_recompute``: the same chunks, each chunk's logits recomputed in backward (one more head matmul).

Peak memory, each variant in a fresh process of its own (this script re-run with ``--_probe``): build the
module, one warm-up step, then the measured step. CPU: ``VmHWM - VmRSS`` from /proc/self/status, the high-water
mark reset right before the step (``echo 5 > /proc/self/clear_refs``): the resident memory the step added at its
peak, allocator slack included (torch keeps no CPU allocator statistics). Where the reset is not allowed,
``ru_maxrss`` (lifetime peak) stands in and the JSON says so. CUDA: ``torch.cuda.max_memory_allocated`` over the
step minus what was allocated before it.

Step time, all variants in ONE process on one model (the plain variant calls the same model with ``labels=``;
its head computes ``F.linear`` logits outside the loss context, exactly nn.Linear): warm-up, then rounds in which
every variant takes one step, the starting variant rotating. Per round the ratio chunked / plain; reported: the
median ratio and a 90 % bootstrap interval of that median (this box's timing is noisy: other jobs share its 2
cores).

Targets (issue 17): peak memory >= 3x lower with the chunked loss, step time within 10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("plain", "chunked", "chunked_recompute")
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(hidden=512, intermediate=1792, layers=2, heads=8, kv_heads=2, vocab=128_256, batch=4, seq=512,
                dtype="float32"),
    "llama3-8b-2l": dict(hidden=4096, intermediate=14336, layers=2, heads=32, kv_heads=8, vocab=128_256, batch=8,
                         seq=2048, dtype="bfloat16"),
    "smoke": dict(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=2048, batch=2, seq=64,
                  dtype="float32"),
}


def build(preset: dict[str, Any], chunked: bool, chunk_size: int, device: str) -> Any:
    """The product's module around a random-init model of the preset's shape, on ``device``."""
    from effilora_lightning import CausalLMModule, LoRAConfig

    config = dict(model_type="llama", vocab_size=preset["vocab"], hidden_size=preset["hidden"],
                  intermediate_size=preset["intermediate"], num_hidden_layers=preset["layers"],
                  num_attention_heads=preset["heads"], num_key_value_heads=preset["kv_heads"],
                  max_position_embeddings=max(preset["seq"], 64), tie_word_embeddings=False)
    adapter = LoRAConfig(rank=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    module = CausalLMModule(adapter=adapter, model_config=config, dtype=preset["dtype"], chunked_loss=chunked,
                            loss_chunk_size=chunk_size)
    with torch.device(device):  # built where it runs: no host copy of the weights to move (GPU: seconds, not minutes)
        module.configure_model()
    return module.to(device)


def make_batch(preset: dict[str, Any], device: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, preset["vocab"], (preset["batch"], preset["seq"]), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}


class Stepper:
    """One optimizer step of a variant on a module: loss, backward, AdamW."""

    def __init__(self, module: Any, batch: dict[str, torch.Tensor]) -> None:
        from effilora_lightning.losses import find_loss_head
        from effilora_lightning.models.optim import adamw

        self.module, self.batch = module, batch
        self.head = find_loss_head(module.model)
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = adamw(params, 1e-4)

    def loss(self, variant: str) -> torch.Tensor:
        b = self.batch
        if variant == "plain":  # HF's labels= path, whatever head the model has
            return self.module.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                     labels=b["labels"]).loss
        assert self.head is not None, "the module was built with chunked_loss=False"
        self.head.recompute = variant == "chunked_recompute"
        return self.module.training_step(b, 0)

    def step(self, variant: str) -> float:
        loss = self.loss(variant)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: the memory one step of ``args._probe`` adds at its peak."""
    preset = PRESETS[args.preset]
    torch.manual_seed(args.seed)
    module = build(preset, args._probe != "plain", args.chunk_size, args.device)
    stepper = Stepper(module, make_batch(preset, args.device, args.seed))
    stepper.step(args._probe)  # warm-up: AdamW state, one-time allocations
    _sync(args.device)
    out: dict[str, Any] = {"variant": args._probe}
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out["loss"] = stepper.step(args._probe)
        torch.cuda.synchronize()
        out.update(before_mib=before / 2**20, peak_mib=(torch.cuda.max_memory_allocated() - before) / 2**20,
                   method="torch.cuda.max_memory_allocated - memory_allocated before the step")
        return out
    reset = _reset_peak_rss()
    before = _status_kib("VmRSS")
    out["loss"] = stepper.step(args._probe)
    peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.update(before_mib=before / 1024, peak_mib=(peak - before) / 1024,
               method="VmHWM (reset before the step) - VmRSS before it" if reset
               else "ru_maxrss (lifetime peak: reset not allowed) - VmRSS before the step")
    return out


def measure_memory(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    rows = {}
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for variant in VARIANTS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_probe", variant, *_forwarded(args)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe {variant} failed:\n{done.stderr[-3000:]}")
        rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return rows


def _forwarded(args: argparse.Namespace) -> list[str]:
    return ["--preset", args.preset, "--device", args.device, "--chunk-size", str(args.chunk_size),
            "--threads", str(args.threads), "--seed", str(args.seed)]


# ---------------------------------------------------------------------------------------------------- time
def measure_time(args: argparse.Namespace) -> dict[str, list[float]]:
    preset = PRESETS[args.preset]
    torch.manual_seed(args.seed)
    stepper = Stepper(build(preset, True, args.chunk_size, args.device), make_batch(preset, args.device, args.seed))
    for _ in range(args.warmup):
        for variant in VARIANTS:
            stepper.step(variant)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for variant in order:
            _sync(args.device)
            start = time.perf_counter()
            stepper.step(variant)
            _sync(args.device)
            times[variant].append((time.perf_counter() - start) * 1e3)
    return times


def ratio_summary(num: list[float], den: list[float], seed: int = 0, draws: int = 2000) -> dict[str, Any]:
    """Median of the per-round ratios num/den and a 90 % bootstrap interval of that median."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return {"median": statistics.median(ratios), "interval90": [medians[int(0.05 * draws)], medians[int(0.95 * draws)]],
            "per_round": ratios}


# ---------------------------------------------------------------------------------------------------- main
def machine() -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "nproc": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: cpu, or llama3-8b-2l on cuda")
    ap.add_argument("--chunk-size", type=int, default=1024, help="loss_chunk_size (CausalLMModule's default)")
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds (each variant one step per round)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 rounds (the test suite's run)")
    ap.add_argument("--json", default=None, help="write rows, ratios, targets, machine and settings here")
    ap.add_argument("--_probe", default=None, choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.rounds, args.warmup, args.chunk_size = "smoke", 2, 1, 48
    args.preset = args.preset or ("llama3-8b-2l" if args.device == "cuda" else "cpu")
    return args


def report(args: argparse.Namespace, memory: dict[str, dict[str, Any]], times: dict[str, list[float]]
           ) -> dict[str, Any]:
    plain_peak = memory["plain"]["peak_mib"]
    rows = [{"variant": v, "peak_mib": memory[v]["peak_mib"], "before_mib": memory[v]["before_mib"],
             "loss": memory[v]["loss"], "step_ms_median": statistics.median(times[v]), "times_ms": times[v]}
            for v in VARIANTS]
    memory_ratio = {v: plain_peak / memory[v]["peak_mib"] for v in VARIANTS if v != "plain"}
    time_ratio = {v: ratio_summary(times[v], times["plain"], args.seed) for v in VARIANTS if v != "plain"}
    return {
        "rows": rows,
        "memory_plain_over": memory_ratio,
        "time_over_plain": time_ratio,
        "target": {"memory_3x": memory_ratio["chunked"] >= 3.0,
                   "time_within_10pct": time_ratio["chunked"]["median"] <= 1.10,
                   "time_within_10pct_whole_interval": time_ratio["chunked"]["interval90"][1] <= 1.10},
        "memory_method": memory["plain"]["method"],
        "settings": {"preset": args.preset, **PRESETS[args.preset], "device": args.device,
                     "chunk_size": args.chunk_size, "rounds": args.rounds, "warmup": args.warmup},
        "machine": machine(),
        "command": "python benchmarks/loss_memory.py " + " ".join(sys.argv[1:]),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # the module's self.log() outside a Trainer
    if args._probe:
        print(json.dumps(probe(args)))
        return {}
    memory = measure_memory(args)
    times = measure_time(args)
    payload = report(args, memory, times)
    for r in payload["rows"]:
        print(f"{r['variant']:>18}: peak +{r['peak_mib']:8.1f} MiB   step {r['step_ms_median']:9.1f} ms   "
              f"loss {r['loss']:.6f}")
    for v in payload["memory_plain_over"]:
        t = payload["time_over_plain"][v]
        print(f"{v:>18}: memory {payload['memory_plain_over'][v]:.2f}x lower, time x{t['median']:.3f} "
              f"(90 % interval {t['interval90'][0]:.3f}-{t['interval90'][1]:.3f})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return payload


if __name__ == "__main__":
    main()
