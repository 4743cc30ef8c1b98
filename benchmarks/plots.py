"""PNG figures from the JSON that speed.py and quality.py write.

    python benchmarks/plots.py --speed benchmarks/results/speed_cpu_1t.json benchmarks/results/speed_cpu.json \
        --quality benchmarks/results/quality.json

writes ``benchmarks/overhead_vs_keep_ratio.png`` (EffiLoRA's overhead over the floor, relative to PEFT LoRA's, per
keep ratio, with the other methods as reference lines) and ``benchmarks/accuracy_vs_params.png`` (average accuracy,
mean and std over seeds, against trainable parameters; EffiLoRA also at the parameters it updates per step).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
REFERENCES = ("lora", "hydralora", "lily", "full_ft")
_KEEP = re.compile(r"^effilora(_in)?_k([0-9.]+)$")


def _label(payload: dict[str, Any]) -> str:
    threads = payload.get("machine", {}).get("threads", "?")
    return f"{payload.get('preset_name', '?')}, {threads} thread(s)"


def _effilora_series(rows: list[dict[str, Any]], key: str) -> dict[str, list[tuple[float, float, list | None]]]:
    """share_a_by -> [(keep ratio, overhead / PEFT's, 90 % interval)] sorted by keep ratio."""
    series: dict[str, list[tuple[float, float, list | None]]] = {}
    for r in rows:
        m = _KEEP.match(r["method"])
        if m and r.get(key) is not None:
            name = "share_a_by=in_features" if m.group(1) else "share_a_by=target"
            series.setdefault(name, []).append((float(m.group(2)), r[key], r.get(f"{key}_ci90")))
    return {k: sorted(v) for k, v in series.items()}


def plot_overhead(payloads: list[dict[str, Any]], out: Path) -> None:
    keys = [("overhead_vs_peft", "wall-clock"), ("cpu_overhead_vs_peft", "process CPU time")]
    fig, axes = plt.subplots(1, len(payloads), figsize=(6.2 * len(payloads), 4.6), squeeze=False, sharey=True)
    for ax, payload in zip(axes[0], payloads):
        for (key, clock), style in zip(keys, ("-", "--")):
            for name, pts in _effilora_series(payload["rows"], key).items():
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                err = [[y - (p[2] or [y, y])[0] for y, p in zip(ys, pts)], [(p[2] or [y, y])[1] - y for y, p in zip(ys, pts)]]
                ax.errorbar(xs, ys, yerr=err, fmt="o" + style, capsize=3, label=f"EffiLoRA {name} ({clock})")
        by = {r["method"]: r for r in payload["rows"]}
        for ref in REFERENCES:
            if ref in by and by[ref].get("overhead_vs_peft") is not None:
                ax.axhline(by[ref]["overhead_vs_peft"], lw=0.8, ls=":", color="gray")
                ax.text(1.02, by[ref]["overhead_vs_peft"], ref, fontsize=7, va="center", color="gray")
        ax.axhline(1.0, color="black", lw=1.0, label="PEFT LoRA (= 1)")
        ax.axhline(0.3, color="tab:red", lw=1.0, ls="--", label="target (0.3)")
        ax.set(xlabel="keep_ratio", title=_label(payload), xticks=[0.25, 0.5, 1.0], xlim=(0.15, 1.12))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("overhead over the floor / PEFT LoRA's overhead")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def plot_accuracy(payload: dict[str, Any], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in payload["rows"]:
        acc = r["accuracy"]["average"]
        y, e = 100 * acc["mean"], 100 * acc["std"]
        line = ax.errorbar(r["trainable"], y, yerr=e, fmt="o", capsize=3, label=r["method"])
        if r["updated_per_step"] < r["trainable"] - 0.5:  # also where it sits by parameters updated per step
            color = line[0].get_color()
            ax.plot([r["updated_per_step"], r["trainable"]], [y, y], color=color, lw=0.8, ls=":")
            ax.plot(r["updated_per_step"], y, "o", mfc="none", color=color)
    ax.set(xscale="log", xlabel="trainable adapter parameters (hollow: updated per step)",
           ylabel="average accuracy over 8 tasks (%)",
           title=f"tiny LLaMA, commonsense: mean ± std over seeds {payload['study']['seeds']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def plot_frontier(result: dict[str, Any], out: Path) -> None:
    """quality2.py's frontier: average accuracy (mean, 95 % t-interval over paired seeds) against counted adapter
    FLOPs per training step (left, relative to LoRA's) and against parameters updated per step (right). Rows with
    a teacher-forced choice accuracy (round 4 on) plot it filled and the greedy-generation accuracy hollow."""
    cost = result["cost"]["rows"]
    rows = result["rows"]
    choice = bool(rows) and all("choice" in r for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.0), sharey=True)
    for r in rows:
        xs = (cost[r["method"]]["adapter_flops_vs_lora"], r["updated_per_step"])
        metrics = [("choice", "o", None), ("accuracy", "o", "none")] if choice else [("accuracy", "o", None)]
        for ax, x in zip(axes, xs):
            color = None
            for key, fmt, face in metrics:
                y, (lo, hi) = r[key]["mean"], r[key]["ci95"]
                line = ax.errorbar(x, y, yerr=[[y - lo], [hi - y]], fmt=fmt, capsize=3, color=color,
                                   mfc=face, label=r["method"] if key == metrics[0][0] else None)
                color = line[0].get_color()
            y = r[metrics[0][0]]["mean"]
            ax.annotate(r["method"].replace("effilora_", ""), (x, y), fontsize=6, xytext=(4, 3),
                        textcoords="offset points")
    n = len(rows[0]["seeds"]) if rows else 0
    what = ("accuracy, 8 tasks (%): choice filled, generation hollow" if choice
            else "average accuracy over 8 tasks (%)")
    axes[0].set(xlabel="adapter FLOPs per training step / LoRA's (counted: torch.utils.flop_counter)", ylabel=what)
    axes[1].set(xlabel="adapter parameters updated per optimizer step", xscale="log")
    for ax in axes:
        ax.axhline(35.4, color="gray", lw=0.8, ls="--")  # chance: 2 to 4 balanced answers per task
        ax.grid(alpha=0.3, which="both")
    axes[0].text(axes[0].get_xlim()[0], 35.9, " chance 35.4 %", fontsize=7, color="gray")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"tiny LLaMA, 12 layers, commonsense: mean and 95 % interval over {n} paired seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed", nargs="*", default=[], help="speed.py JSON files (one panel each)")
    ap.add_argument("--quality", default=None, help="quality.py JSON file")
    ap.add_argument("--out-dir", default=str(HERE))
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.speed:
        plot_overhead([json.loads(Path(p).read_text()) for p in args.speed], out / "overhead_vs_keep_ratio.png")
    if args.quality:
        plot_accuracy(json.loads(Path(args.quality).read_text()), out / "accuracy_vs_params.png")


if __name__ == "__main__":
    main()
