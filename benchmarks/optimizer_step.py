"""One AdamW step over an adapter's parameters, torch's three implementations side by side.

torch picks the for-loop AdamW (a Python loop over every parameter, every step) for CPU tensors and ``foreach`` for
CUDA ones; the modules name ``fused`` (``effilora_lightning.models.optim``). This times what that choice changes,
isolated: the optimizer step alone, on the adapter parameter sets the product trains, with gradients in place, on
the CPU or (``--device cuda``, the GPU check's ``optimizer`` step) on a GPU, synchronised around each timed
block. Per parameter set, ONE process, the implementations interleaved with a rotating start, each round's ratio
for_loop / foreach and for_loop / fused taken from the same round, reported as the median with a 95 % interval over
rounds. It also checks what each implementation computes: foreach against the for loop bit for bit (on CUDA too,
where the loop and the multi-tensor kernels may round differently: the flag records it), fused's largest difference.

Parameter sets (fp32, as the adapters train):

* ``demo-lora-r16``: benchmarks/padding.py's timed model (tiny-llama, LoRA rank 16 on q, k, v, up, down);
* ``demo-effilora-r8``: the CPU demo's adapter (configs/demo/commonsense_effilora.yaml: EffiLoRA rank 8);
* ``llama3-8b-lora-r16``: LoRA rank 16 on all seven projections of LLaMA-3-8B's 32 layers, by shape (no model).

    .venv/bin/python benchmarks/optimizer_step.py --rounds 40 --steps 10
    python3 benchmarks/optimizer_step.py --device cuda --out OUT/optimizer_step_cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from data_setup import machine  # noqa: E402
from padding import interval  # noqa: E402

from effilora_lightning import EffiLoRAConfig, LoRAConfig, apply_adapter  # noqa: E402
from effilora_lightning.models.optim import ADAMW_IMPLEMENTATIONS, adamw  # noqa: E402

TINY = ROOT / "data" / "checkpoints" / "tiny-llama"
SETS = ("demo-lora-r16", "demo-effilora-r8", "llama3-8b-lora-r16")
DEMO_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def parameter_shapes(name: str) -> list[tuple[int, ...]]:
    """The trainable tensors' shapes of a parameter set (module docstring)."""
    if name == "llama3-8b-lora-r16":
        # (in, out) of q, k, v, o, gate, up, down at hidden 4096, 8 KV heads of 128, MLP 14,336; A (r, in), B (out, r)
        dims = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)]
        return [shape for _ in range(32) for d_in, d_out in dims for shape in ((16, d_in), (d_out, 16))]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(TINY), local_files_only=True)
    config = (LoRAConfig(rank=16, target_modules=DEMO_TARGETS) if name == "demo-lora-r16"
              else EffiLoRAConfig(rank=8, alpha=16, target_modules=DEMO_TARGETS))
    apply_adapter(model, config)
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def _optimizers(shapes: list[tuple[int, ...]], device: torch.device
                ) -> dict[str, tuple[list[torch.Tensor], torch.optim.Optimizer]]:
    """One copy of the same parameters and gradients per implementation (drawn on the CPU, so every device starts
    from the same values)."""
    out = {}
    for impl in ADAMW_IMPLEMENTATIONS:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device)
        out[impl] = (params, adamw(params, 1e-4, weight_decay=0.01, implementation=impl))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, rounds: int, steps: int, device: str | torch.device = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    shapes = parameter_shapes(name)
    opts = _optimizers(shapes, device)
    for _, opt in opts.values():  # warm-up, and the state every implementation then holds
        for _ in range(3):
            opt.step()
    ref = [p.detach() for p in opts["for_loop"][0]]
    agree = {impl: {"bit_identical_to_for_loop": all(torch.equal(a, b) for a, b in zip(ref, params)),
                    "max_abs_diff": max(float((a - b.detach()).abs().max()) for a, b in zip(ref, params))}
             for impl, (params, _) in opts.items()}
    ms: dict[str, list[float]] = {impl: [] for impl in ADAMW_IMPLEMENTATIONS}
    ratios: dict[str, list[float]] = {impl: [] for impl in ADAMW_IMPLEMENTATIONS if impl != "for_loop"}
    keys = list(ADAMW_IMPLEMENTATIONS)
    with torch.no_grad():
        for r in range(rounds):
            got = {}
            for impl in keys[r % len(keys):] + keys[: r % len(keys)]:  # rotating start
                opt = opts[impl][1]
                _sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    opt.step()
                _sync(device)
                got[impl] = (time.perf_counter() - start) / steps * 1e3
            for impl, value in got.items():
                ms[impl].append(value)
            for impl in ratios:
                ratios[impl].append(got["for_loop"] / got[impl])
    out: dict[str, Any] = {"tensors": len(shapes), "numel": sum(torch.Size(s).numel() for s in shapes),
                           "agreement": agree, "ms_per_step_median": {k: statistics.median(v) for k, v in ms.items()}}
    for impl, values in ratios.items():
        low, high = interval(values)
        out[f"for_loop_over_{impl}"] = {"median": statistics.median(values), "ratio_95": [low, high]}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per implementation per round")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default benchmarks/results/optimizer_step_<device type>.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    out = args.out or ROOT / "benchmarks" / "results" / f"optimizer_step_{device.type}.json"
    result: dict[str, Any] = {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "device": str(device),
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "rounds": args.rounds, "steps_per_round": args.steps,
                              "sets": {name: measure(name, args.rounds, args.steps, device) for name in args.sets}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result["sets"].items():
        print(f"{name}: {r['tensors']} tensors, {r['numel']:,} values; ms/step "
              + ", ".join(f"{k} {v:.3f}" for k, v in r["ms_per_step_median"].items())
              + "; for_loop/foreach {median:.2f} ({ratio_95[0]:.2f}-{ratio_95[1]:.2f})".format(**r["for_loop_over_foreach"])
              + "; for_loop/fused {median:.2f} ({ratio_95[0]:.2f}-{ratio_95[1]:.2f})".format(**r["for_loop_over_fused"])
              + f"; foreach bit-identical: {r['agreement']['foreach']['bit_identical_to_for_loop']}, fused max diff "
              f"{r['agreement']['fused']['max_abs_diff']:.1e}")
    return result


if __name__ == "__main__":
    main()
