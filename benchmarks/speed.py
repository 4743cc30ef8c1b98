"""Step time, peak memory and parameter counts of every adapter method on one model, side by side.

    python benchmarks/speed.py --json benchmarks/results/speed_cpu.json        # CPU default (below), ~10 min
    python benchmarks/speed.py --smoke --json /tmp/speed_smoke.json            # tiny model, 2 reps, < 20 s
    python benchmarks/speed.py --device cuda --json speed_h200.json            # LLaMA-3-8B shapes, bf16
    python benchmarks/speed.py --device cuda --preset llama3-8b-8l --reps 5   # 8 of its 32 layers: ~1/4 of the time
    python benchmarks/speed.py --methods floor peft_lora effilora_k0.5 --reps 3 --profile benchmarks/results/profile
    python benchmarks/speed.py --rss                                           # + peak RSS, one process per method
    python benchmarks/speed.py --threads 1 --op-costs                          # each adapter op's cost, isolated

CPU default: a LLaMA-shaped model (8 layers, 512 wide, MLP 1792 = 3.5x as in LLaMA-3-8B, 8 query heads over 2
key/value heads, vocab 4096 so the LM head is ~7 % of the weights as in the 8B), batch 4 x 256 tokens, fp32,
2 threads; every method at rank 16 (alpha 32, no dropout) on all seven projections.

What is measured, and why it is fair:
  * Same weights, batch and sequence for all. The base model is built once from a seed; every method's model
    is a copy that SHARES the frozen weight tensors (full fine-tuning gets its own copy: it writes them).
  * Every model is built up front, then timing interleaves: warm-up steps for each, then for each repetition
    every method takes one step; the starting method rotates each repetition so none always runs after the
    same neighbour (cache state, frequency scaling, other load on the machine hit all methods alike).
    Reported: the median over repetitions.
  * A step = forward + backward + AdamW step (+ the Reducer's begin_step/end_step for EffiLoRA, exactly what
    EffiLoRACallback runs: freeze the unselected B, score, EMA, draw the next selection).
  * The floor = the frozen model with gradients flowing through activations and no adapter: Hugging Face's
    ``enable_input_require_grads()`` (a forward hook making the embeddings' output require grad, what PEFT
    itself uses under gradient checkpointing). It computes every activation gradient an adapter needs, no
    weight gradient, and has nothing to optimise. A method's overhead is ``t - t_floor``; the floor computes
    the input gradient of layer 0's projections, which adapters skip, so overheads are if anything understated
    by the same tiny amount (< 1 % of a step) for every method.
  * Peak memory (``peak_mib``), the same definition on both devices: the bytes of every tensor alive at the
    start of a step (weights, adapters, optimizer state, batch; shared base weights counted for each method, as
    if it ran alone) plus the highest extra torch allocation during one step (activations, gradients, the
    optimizer's temporaries). On CUDA the extra comes from ``torch.cuda.max_memory_allocated``; on CPU torch
    keeps no allocator statistics (``torch.accelerator.memory_stats("cpu")`` is empty), so it comes from the
    profiler's allocation events (``profile_memory=True``: every c10 CPU alloc/free with its size, summed in
    time order). ``--rss`` adds a whole-process check: each method in a fresh process, ``ru_maxrss`` after
    three steps (includes Python, libraries and allocator slack, hence larger and noisier). On CUDA each row
    also has ``cuda_max_allocated_mib``, the raw ``torch.cuda.max_memory_allocated`` of that step (every
    method's adapters and optimizer state are on the device together, so it is a shade above one method alone).

On CUDA (``--device cuda``, LLaMA-3-8B shapes in bf16 by default; adapters stay fp32 as PEFT's do, methods
ending in ``_bf16`` keep them in bf16, the path where the in-place low-rank add applies), every row also has:
  * ``mfu_4n``: 4 N FLOPs per token over the step time and the device's dense peak, N = the base's matmul
    weights (every Linear and the LM head, not the embedding table): forward (2N) plus the activation gradients
    (2N), the least any adapter step computes. ``mfu`` adds attention and the trained weights' gradients.
  * ``mfu_4n_vs_matmul``: the same against a bf16 8192^3 matrix product timed in this run (``matmul_tflops`` in
    the JSON), the rate this card reaches here on the most favourable GEMM.
  The dense peak comes from ``--peak-tflops``, else the datasheet's dense figure for the chip (H100/H200 SXM:
  989.4 TFLOP/s bf16; Lightning's table has the H200 at its 2:4-sparse rate, 2.0e15, and does not match the
  name an H200 reports, 'NVIDIA H200').
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from effilora_lightning.adapters import (
    EffiLoRAConfig,
    HydraLoRAConfig,
    LilyConfig,
    LoRAConfig,
    apply_adapter,
    is_adapter_param,
)
from effilora_lightning.models.optim import adamw
from effilora_lightning.selection import Reducer, effilora_units

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 2**20


@dataclass(frozen=True)
class Preset:
    """A LLaMA-shaped model and the batch it trains on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    dtype: str
    rank: int = 16
    alpha: float = 32.0


PRESETS = {
    "cpu": Preset(8, 512, 1792, 8, 2, 4096, 4, 256, "float32"),
    # Two decoder layers of "cpu" and a small vocabulary: the same per-layer adapter work in ~1/6 of the step
    # time, so on a shared, noisy machine the same wall time buys ~6x the repetitions.
    "cpu-slice": Preset(2, 512, 1792, 8, 2, 256, 4, 256, "float32"),
    "smoke": Preset(2, 64, 224, 4, 2, 256, 2, 32, "float32", rank=4, alpha=8.0),
    "llama3-8b": Preset(32, 4096, 14336, 32, 8, 128256, 2, 2048, "bfloat16"),
    # 8 of the 8B's 32 decoder layers with its real vocabulary: every per-layer shape of the 8B at a quarter of
    # the layer time (the LM head's share of a step is then ~4x larger than in the full model).
    "llama3-8b-8l": Preset(8, 4096, 14336, 32, 8, 128256, 2, 2048, "bfloat16"),
}


@dataclass(frozen=True)
class Method:
    """One row of the table: how to adapt the shared base model."""

    name: str
    kind: str  # floor | full | peft_lora | lora | effilora | hydralora | lily
    keep_ratio: float = 1.0
    share_a_by: str = "target"
    adapter_dtype: str = "float32"  # "base": adapters in the base's dtype (bf16 on CUDA: the in-place add applies)


METHODS = {
    m.name: m
    for m in [
        Method("floor", "floor"),
        Method("full_ft", "full"),
        Method("peft_lora", "peft_lora"),
        Method("lora", "lora"),
        Method("effilora_k1.0", "effilora", 1.0),
        Method("effilora_k0.5", "effilora", 0.5),
        Method("effilora_k0.25", "effilora", 0.25),
        Method("effilora_in_k1.0", "effilora", 1.0, "in_features"),
        Method("effilora_in_k0.5", "effilora", 0.5, "in_features"),
        Method("effilora_in_k0.25", "effilora", 0.25, "in_features"),
        Method("hydralora", "hydralora"),
        Method("lily", "lily"),
    ]
}
DEFAULT_CUDA = [n for n in METHODS if n != "full_ft"]  # full AdamW on 8B needs ~64 GiB more than one GPU has
# Only meaningful over a bf16 base (on an fp32 base "base" is fp32, the rows above): selectable with --methods.
BF16_ADAPTER_METHODS = {
    m.name: m
    for m in [
        Method("lora_bf16", "lora", adapter_dtype="base"),
        Method("effilora_k0.5_bf16", "effilora", 0.5, adapter_dtype="base"),
        Method("effilora_in_k0.5_bf16", "effilora", 0.5, "in_features", adapter_dtype="base"),
    ]
}
ALL_METHODS = {**METHODS, **BF16_ADAPTER_METHODS}



# ---------------------------------------------------------------------------------------------- building
def build_base(preset: Preset, device: torch.device, seed: int) -> nn.Module:
    """The frozen LLaMA-shaped base model with random weights (seeded), in eval mode (no dropout anywhere)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=preset.vocab, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads,
        max_position_embeddings=max(preset.seq, 128), rope_theta=500000.0, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, preset.dtype))
    model.requires_grad_(False)
    return model.eval()


def share_weights(base: nn.Module) -> nn.Module:
    """A structural copy of ``base`` whose parameters ARE base's tensors (buffers are copied: they are small)."""
    return copy.deepcopy(base, memo={id(p): p for p in base.parameters()})


def adapter_config(method: Method, preset: Preset) -> Any:
    common = {"rank": preset.rank, "target_modules": list(TARGETS), "seed": 0, "adapter_dtype": method.adapter_dtype}
    if method.kind == "lora":
        return LoRAConfig(alpha=preset.alpha, **common)
    if method.kind == "effilora":
        return EffiLoRAConfig(alpha=preset.alpha, share_a_by=method.share_a_by, **common)
    if method.kind == "hydralora":
        return HydraLoRAConfig(alpha=preset.alpha, **common)  # its default N = 4 B heads per module
    if method.kind == "lily":
        return LilyConfig(**common)  # its defaults: 4 local A blocks, 4 global B experts, no scale
    raise ValueError(f"no adapter config for method kind {method.kind!r}")


def adapt(method: Method, base: nn.Module, preset: Preset) -> nn.Module:
    """The model for one method, built on (a copy sharing) the base weights."""
    if method.kind == "full":
        model = copy.deepcopy(base)  # it writes its weights: own copy
        model.requires_grad_(True)
        return model
    model = share_weights(base)
    if method.kind == "floor":
        model.enable_input_require_grads()
    elif method.kind == "peft_lora":
        import peft

        cfg = peft.LoraConfig(r=preset.rank, lora_alpha=preset.alpha, lora_dropout=0.0, target_modules=list(TARGETS))
        model = peft.get_peft_model(model, cfg)
    else:
        apply_adapter(model, adapter_config(method, preset))
    return model


def trainable_params(model: nn.Module, method: Method) -> list[nn.Parameter]:
    """What the optimizer gets: every adapter parameter by NAME (a frozen B included), or all for full."""
    if method.kind == "full":
        return list(model.parameters())
    return [p for n, p in model.named_parameters() if is_adapter_param(n)]


# ---------------------------------------------------------------------------------------------- one step
@dataclass
class Bench:
    """One method ready to step: model, optimizer, Reducer (EffiLoRA), and what its steps measured."""

    method: Method
    model: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer | None
    reducer: Reducer | None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    updated: list[int] = field(default_factory=list)
    step_index: int = 0

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        if self.reducer is not None:
            self.reducer.begin_step()
        loss = self.model(**batch).loss
        loss.backward()
        self.updated.append(sum(p.numel() for p in self.params if p.grad is not None))
        if self.reducer is not None:
            self.reducer.end_step(self.step_index)
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1


def make_bench(method: Method, base: nn.Module, preset: Preset) -> Bench:
    model = adapt(method, base, preset)
    model.train()  # no dropout is configured anywhere, so train() changes no arithmetic
    params = trainable_params(model, method)
    optimizer = adamw(params, 1e-5) if params else None
    reducer = Reducer(effilora_units(model), keep_ratio=method.keep_ratio) if method.kind == "effilora" else None
    return Bench(method, model, params, optimizer, reducer)


def make_batch(preset: Preset, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, preset.vocab, (preset.batch, preset.seq), generator=g).to(device)  # (B, T)
    return {"input_ids": ids, "labels": ids}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(bench: Bench, batch: dict[str, torch.Tensor], device: torch.device) -> None:
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    bench.step(batch)
    sync(device)
    bench.times.append(time.perf_counter() - t0)
    bench.cpu_times.append(time.process_time() - c0)


def run_interleaved(benches: list[Bench], batch: dict[str, torch.Tensor], device: torch.device,
                    warmup: int, reps: int, log: Callable[[str], None]) -> None:
    """Warm-up steps for every method, then ``reps`` rounds of one timed step each, order rotated per round."""
    for b in benches:
        for _ in range(warmup):
            b.step(batch)
        b.times.clear()
        b.cpu_times.clear()
        b.updated.clear()
    n = len(benches)
    for rep in range(reps):
        for b in benches[rep % n:] + benches[: rep % n]:
            timed_step(b, batch, device)
        log(f"rep {rep + 1}/{reps}: " + " ".join(f"{b.method.name}={1e3 * b.times[-1]:.0f}ms" for b in benches))


# ---------------------------------------------------------------------------------------------- memory
def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct tensor storages in ``tensors`` (an iterable; nested dicts/lists are walked)."""
    seen: dict[int, int] = {}
    stack = list(tensors)
    while stack:
        t = stack.pop()
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        elif isinstance(t, dict):
            stack.extend(t.values())
        elif isinstance(t, (list, tuple)):
            stack.extend(t)
    return sum(seen.values())


def resident_bytes(bench: Bench, batch: dict[str, torch.Tensor]) -> int:
    """Everything this method holds between steps: weights, buffers, optimizer state, the batch."""
    state = list(bench.optimizer.state.values()) if bench.optimizer is not None else []
    return tensor_bytes([*bench.model.parameters(), *bench.model.buffers(), state, batch])


def step_peak_extra(bench: Bench, batch: dict[str, torch.Tensor], device: torch.device) -> int:
    """Highest torch allocation during one step above what was alive at its start, in bytes."""
    if device.type == "cuda":
        sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        bench.step(batch)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        bench.step(batch)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    total = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        total += e.nbytes()
        peak = max(peak, total)
    return peak


def measure_memory(bench: Bench, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    bench.step(batch)  # any lazily created optimizer state exists now
    resident = resident_bytes(bench, batch)
    extra = step_peak_extra(bench, batch, device)
    out = {"resident_mib": resident / MIB, "step_extra_mib": extra / MIB, "peak_mib": (resident + extra) / MIB}
    if device.type == "cuda":  # the step's raw peak (stats were reset at its start): all methods' state included
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    return out


def rss_probe(name: str, preset_name: str, seed: int) -> dict[str, float]:
    """In THIS (fresh) process: build one method, take 3 steps, report the process's peak RSS."""
    preset, device = PRESETS[preset_name], torch.device("cpu")
    base = build_base(preset, device, seed)
    bench = make_bench(ALL_METHODS[name], base, preset)
    del base
    batch = make_batch(preset, device, seed)
    for _ in range(3):
        bench.step(batch)
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB


def rss_in_subprocess(name: str, preset_name: str, seed: int, threads: int) -> float:
    cmd = [sys.executable, __file__, "--_rss-probe", name, "--preset", preset_name, "--seed", str(seed),
           "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]


# ---------------------------------------------------------------------------------------------- flops
def model_flops_per_step(preset: Preset, trainable_updated: float) -> float:
    """Useful FLOPs of one adapter step: linear layers forward (2N) and input-gradient (2N) per token, weight
    gradients only for what trains (2 per updated parameter per token), attention forward 4 s d L per token
    and backward twice that (Megatron convention, causal mask not discounted)."""
    p = preset
    kv = p.hidden * p.kv_heads // p.heads
    per_layer = p.hidden * (2 * p.hidden + 2 * kv) + 3 * p.hidden * p.intermediate
    linear = p.layers * per_layer + p.vocab * p.hidden
    tokens = p.batch * p.seq
    attention = 12 * p.seq * p.hidden * p.layers
    return tokens * (4 * linear + attention + 2 * trainable_updated)


def matmul_params(preset: Preset) -> int:
    """N of the 4N floor: the base's matmul weights (every Linear and the LM head; not the embedding table)."""
    p = preset
    kv = p.hidden * p.kv_heads // p.heads
    return p.layers * (p.hidden * (2 * p.hidden + 2 * kv) + 3 * p.hidden * p.intermediate) + p.vocab * p.hidden


def peak_flops(device: torch.device, dtype: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(dense peak FLOP/s of one device at ``dtype``, where the figure came from); (None, why) off CUDA."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak on CPU"
    from effilora_lightning.callbacks.peak_flops import dense_peak_flops

    name = torch.cuda.get_device_name(device)
    flops = dense_peak_flops(name, getattr(torch, dtype), device)  # the callback's own figure (datasheet, dense)
    return (float(flops), f"dense_peak_flops({name!r}, {dtype})") if flops else (None, f"unknown device {name!r}")


def measure_matmul_flops(device: torch.device, dtype: str, n: int = 8192, reps: int = 10) -> float | None:
    """FLOP/s of an n^3 matrix product in ``dtype`` on random data, median of ``reps`` timed with CUDA events."""
    if device.type != "cuda":
        return None
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype), generator=g)
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype), generator=g)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times)


# ---------------------------------------------------------------------------------------------- report
def _overheads(benches: list[Bench], attr: str) -> dict[str, dict[str, Any]]:
    """Per method: median seconds of ``attr`` (times or cpu_times), x floor, overhead, overhead / PEFT's, and a
    90 % bootstrap interval of overhead / PEFT's (rounds resampled jointly, keeping the interleaving's pairing)."""
    series = {b.method.name: getattr(b, attr) for b in benches}
    point = _ratios({n: statistics.median(v) for n, v in series.items()})
    rounds, rng, draws = len(benches[0].times), random.Random(0), []
    for _ in range(1000 if rounds > 2 else 0):
        pick = [rng.randrange(rounds) for _ in range(rounds)]
        draws.append(_ratios({n: statistics.median(v[i] for i in pick) for n, v in series.items()}))
    for name, row in point.items():
        vals = sorted(d[name]["vs_peft"] for d in draws if d[name]["vs_peft"] is not None)
        row["vs_peft_ci"] = [vals[int(0.05 * len(vals))], vals[int(0.95 * len(vals)) - 1]] if vals else None
    return point


def _ratios(med: dict[str, float]) -> dict[str, dict[str, Any]]:
    floor = med.get("floor")
    peft = med["peft_lora"] - floor if floor is not None and "peft_lora" in med else None
    out = {}
    for name, t in med.items():
        over = t - floor if floor is not None else None
        out[name] = {"t": t, "vs_floor": t / floor if floor else None, "over": over,
                     "vs_peft": over / peft if over is not None and peft else None}
    return out


def summarise(benches: list[Bench], memory: dict[str, dict[str, float]], preset: Preset,
              peak: float | None = None, matmul: float | None = None) -> list[dict[str, Any]]:
    wall, cpu = _overheads(benches, "times"), _overheads(benches, "cpu_times")
    floor_4n = 4 * matmul_params(preset) * preset.batch * preset.seq  # FLOPs of one step's 4N floor
    rows = []
    for b in benches:
        w, c = wall[b.method.name], cpu[b.method.name]
        q1, _, q3 = statistics.quantiles(b.times, n=4) if len(b.times) > 1 else (w["t"],) * 3
        updated = statistics.mean(b.updated) if b.updated else 0.0
        row = {
            "method": b.method.name, "step_ms": 1e3 * w["t"], "iqr_ms": 1e3 * (q3 - q1), "min_ms": 1e3 * min(b.times),
            "vs_floor": w["vs_floor"], "overhead_ms": _scale(w["over"], 1e3),
            "overhead_vs_peft": w["vs_peft"], "overhead_vs_peft_ci90": w["vs_peft_ci"],
            "cpu_ms": 1e3 * c["t"], "cpu_overhead_ms": _scale(c["over"], 1e3),
            "cpu_overhead_vs_peft": c["vs_peft"], "cpu_overhead_vs_peft_ci90": c["vs_peft_ci"],
            "trainable": sum(p.numel() for p in b.params), "updated_per_step": updated,
            "tokens_per_s": preset.batch * preset.seq / w["t"],
            "times_ms": [1e3 * t for t in b.times], "cpu_times_ms": [1e3 * t for t in b.cpu_times],
            **memory.get(b.method.name, {}),
        }
        if peak:
            row["mfu"] = model_flops_per_step(preset, updated) / w["t"] / peak
            row["mfu_4n"] = floor_4n / w["t"] / peak
        if matmul:
            row["mfu_4n_vs_matmul"] = floor_4n / w["t"] / matmul
        rows.append(row)
    return rows


def _scale(v: float | None, k: float) -> float | None:
    return None if v is None else v * k


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    has_mfu = any("mfu" in r for r in rows)
    has_rss = any("peak_rss_mib" in r for r in rows)
    head = ["method", "step ms (median)", "IQR ms", "x floor", "overhead ms", "overhead / PEFT's",
            "CPU-time overhead / PEFT's", "peak MiB", "trainable", "updated / step", "tokens/s"]
    head += ["MFU (4N)", "MFU (model)"] * has_mfu + ["peak RSS MiB"] * has_rss
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], _fmt(r["step_ms"], ".1f"), _fmt(r["iqr_ms"], ".1f"), _fmt(r["vs_floor"], ".3f"),
                 _fmt(r["overhead_ms"], ".1f"), _fmt(r["overhead_vs_peft"], ".2f"),
                 _fmt(r["cpu_overhead_vs_peft"], ".2f"), _fmt(r.get("peak_mib"), ".1f"),
                 f"{r['trainable']:,}", f"{r['updated_per_step']:,.0f}", _fmt(r["tokens_per_s"], ",.0f")]
        if has_mfu:
            cells += [_fmt(100 * r["mfu_4n"], ".1f") + " %", _fmt(100 * r["mfu"], ".1f") + " %"]
        cells += [_fmt(r.get("peak_rss_mib"), ".0f")] * has_rss
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_check(rows: list[dict[str, Any]], name: str = "effilora_k0.5") -> dict[str, Any]:
    """The issue's target for EffiLoRA keep 0.5: overhead <= 0.3 x PEFT's, memory <= PEFT's, params <= 1/4 LoRA's."""
    by = {r["method"]: r for r in rows}
    if name not in by or "peft_lora" not in by:
        return {}
    e, p = by[name], by["peft_lora"]
    return {
        "method": name,
        "overhead_vs_peft": e["overhead_vs_peft"], "overhead_ok": (e["overhead_vs_peft"] or 9) <= 0.3,
        "peak_mib": e.get("peak_mib"), "peft_peak_mib": p.get("peak_mib"),
        "memory_ok": e.get("peak_mib", 0) <= p.get("peak_mib", 0),
        "params_ratio": e["trainable"] / p["trainable"], "params_ok": e["trainable"] <= p["trainable"] / 4,
        **({"mfu_4n": e["mfu_4n"], "mfu_ok": e["mfu_4n"] >= 0.5} if "mfu_4n" in e else {}),
    }


def profile_methods(benches: list[Bench], batch: dict[str, torch.Tensor], out_dir: str, steps: int = 3) -> None:
    """torch.profiler tables (self CPU time by op, and by input shape) for each bench, one file each."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(out_dir, exist_ok=True)
    for b in benches:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                b.step(batch)
        by_op = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40)
        with open(os.path.join(out_dir, f"{b.method.name}.txt"), "w") as f:
            f.write(f"# {b.method.name}: {steps} steps\n\n{by_op}\n\n# by input shape\n\n{by_shape}\n")


def op_costs(preset: Preset, reps: int = 100) -> str:
    """Median time of each operation a rank-r adapter adds to one projection, next to the base GEMM (N = B*T).

    The profile in numbers: which adapter ops cost what at this model's shapes, measured in isolation with the
    thread's CPU clock (so other processes on the machine barely move them).
    """
    n, r, kv = preset.batch * preset.seq, preset.rank, preset.hidden * preset.kv_heads // preset.heads
    shapes = {"q/o": (preset.hidden, preset.hidden), "k/v": (preset.hidden, kv),
              "gate/up": (preset.hidden, preset.intermediate), "down": (preset.intermediate, preset.hidden)}
    cols = {f"{name} ({i}->{o})": _op_column(n, r, i, o, reps) for name, (i, o) in shapes.items()}
    head = [f"op (median us, N = {n}, r = {r})", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for op in next(iter(cols.values())):
        lines.append("| " + " | ".join([op, *(f"{c[op]:,.0f}" for c in cols.values())]) + " |")
    return "\n".join(lines)


def _op_column(n: int, r: int, d_in: int, d_out: int, reps: int) -> dict[str, float]:
    x, w, a, b = torch.randn(n, d_in), torch.randn(d_out, d_in), torch.randn(r, d_in), torch.randn(d_out, r)
    y, g, h = torch.randn(n, d_out), torch.randn(n, d_out), torch.randn(n, r)
    ops = {
        "base GEMM x W0^T (forward)": lambda: x @ w.t(), "A x (down-projection)": lambda: x @ a.t(),
        "B h (up-projection)": lambda: h @ b.t(), "y * scale": lambda: y * 2.0, "y + delta": lambda: y + g,
        "dH = g B": lambda: g @ b, "dB = g^T h (autograd's orientation)": lambda: g.t() @ h,
        "dB = (h^T g)^T": lambda: (h.t() @ g).t(), "dA = dH^T x": lambda: h.t() @ x,
        "dX_a = dH A": lambda: h @ a, "dX accumulate (dX + dX_a)": lambda: x + x,
        "fused in place: y.addmm_(h, B^T)": lambda: y.addmm_(h, b.t(), alpha=1e-3),
    }
    return {k: _median_us(f, reps) for k, f in ops.items()}


def _median_us(fn: Callable[[], Any], reps: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return 1e6 * statistics.median(ts)


def machine() -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "nproc": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    try:
        info["loadavg_end"] = os.getloadavg()
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(), gpu_capability=f"{props.major}.{props.minor}",
                    gpu_memory_mib=props.total_memory / MIB, gpu_sms=props.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    for pkg in ("transformers", "peft", "lightning"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            pass
    return info


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: cpu, or llama3-8b on cuda")
    ap.add_argument("--methods", nargs="+", default=None, choices=sorted(ALL_METHODS), metavar="METHOD",
                    help=f"default: all on CPU, all but full_ft on CUDA; choose from {', '.join(ALL_METHODS)}")
    ap.add_argument("--reps", type=int, default=15, help="timed steps per method, interleaved")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense peak TFLOP/s of one device at the preset's dtype, for MFU (default: by device name)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 reps, 1 warm-up (the test suite's run)")
    ap.add_argument("--json", default=None, help="write rows, target check, machine and settings here")
    ap.add_argument("--rss", action="store_true", help="also peak RSS, each method in a fresh process (CPU)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after timing, write torch.profiler tables of every selected method to DIR")
    ap.add_argument("--op-costs", action="store_true",
                    help="only print the cost of each adapter operation at the preset's shapes (microbenchmark)")
    ap.add_argument("--_rss-probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.reps, args.warmup = "smoke", 2, 1
    args.preset = args.preset or ("llama3-8b" if args.device == "cuda" else "cpu")
    args.methods = args.methods or (DEFAULT_CUDA if args.device == "cuda" else list(METHODS))
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._rss_probe:
        print(json.dumps(rss_probe(args._rss_probe, args.preset, args.seed)))
        return []
    if args.op_costs:
        print(op_costs(PRESETS[args.preset]))
        return []
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    preset, device = PRESETS[args.preset], torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    peak, peak_source = peak_flops(device, preset.dtype, args.peak_tflops)
    matmul = measure_matmul_flops(device, preset.dtype)
    if matmul:
        log(f"{preset.dtype} 8192^3 matmul: {matmul / 1e12:.0f} TFLOP/s; peak for MFU: "
            f"{_fmt(peak and peak / 1e12, '.1f')} TFLOP/s ({peak_source})")
    built = time.time()
    base = build_base(preset, device, args.seed)
    benches = [make_bench(ALL_METHODS[n], base, preset) for n in args.methods]
    batch = make_batch(preset, device, args.seed)
    log(f"built {len(benches)} models on {device} ({args.preset}) in {time.time() - built:.1f} s; "
        f"warm-up {args.warmup}, reps {args.reps}")
    if device.type == "cpu" and os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5:
        log(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other processes share the "
            "cores, wall-clock times will be noisy (compare the CPU-time columns; consider --threads 1 and more --reps)")
    started, load = time.time(), os.getloadavg()
    run_interleaved(benches, batch, device, args.warmup, args.reps, log)
    memory = {b.method.name: measure_memory(b, batch, device) for b in benches}
    if args.rss:
        for b in benches:
            memory[b.method.name]["peak_rss_mib"] = rss_in_subprocess(b.method.name, args.preset, args.seed, args.threads)
    rows = summarise(benches, memory, preset, peak, matmul)
    check = target_check(rows)
    print(markdown_table(rows))
    if check:
        print("\ntarget (effilora_k0.5):", json.dumps(check))
    if args.profile:
        profile_methods(benches, batch, args.profile)
    if args.json:
        payload = {"preset": asdict(preset), "preset_name": args.preset, "device": args.device, "reps": args.reps,
                   "warmup": args.warmup, "targets": TARGETS, "machine": machine(), "rows": rows, "target": check,
                   "seconds": time.time() - started, "loadavg_start": load, "peak_flops": peak,
                   "peak_flops_source": peak_source, "matmul_tflops": matmul and matmul / 1e12,
                   "matmul_params": matmul_params(preset), "build_seconds": started - built,
                   "methods": {n: asdict(ALL_METHODS[n]) for n in args.methods}}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
