"""Does the batching cost accuracy? The commonsense demo with random, length-grouped or packed batches, paired seeds.

    .venv/bin/python benchmarks/grouping_accuracy.py --seeds 0 1 2 --json benchmarks/results/grouping_accuracy_cpu.json
    .venv/bin/python benchmarks/grouping_accuracy.py --batchings random packed --seeds 0 1 2 3 4 --json packed.json
    .venv/bin/python benchmarks/grouping_accuracy.py --smoke --json /tmp/grouping_smoke.json        # seconds

Each run is ``effilora fit --config configs/demo/commonsense_effilora.yaml`` (through ``effilora_lightning.cli.run``,
the product's own path) with the seed set for both ``seed_everything`` and the data module, and the batching of
``--batchings``: ``random`` (the demo's), ``grouped`` (``group_by_length: true``) or ``packed``
(``pack_sequences: true``, ``pack_width`` 256, its default at the demo's cutoff 128: rows of two or three of the
demo's 55-110-token samples) or ``packed_one_row`` (``pack_width`` 2048, the demo's batch x cutoff: each batch one
row with no padding, under ``attn_implementation: sdpa_packed``); no checkpoints or logs. Two accuracies per run on the 8 test sets: greedy generation (the module's test, LLM-Adapters'
scoring) and the teacher-forced choice of ``choice_scoring`` (which answer of the "Answer format" line the model
finds likeliest). Reported: per seed, and the seed-paired difference of every batching but random minus random
(mean, 95 % t-interval).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import choice_scoring  # noqa: E402
from quality2 import interval  # noqa: E402

from effilora_lightning.cli import run  # noqa: E402
from effilora_lightning.data.commonsense_prompts import TASKS, build_train_prompt  # noqa: E402

DEMO = ROOT / "configs/demo/commonsense_effilora.yaml"


BATCHINGS = {"random": {}, "grouped": {"group_by_length": True},
             "packed": {"pack_sequences": True, "pack_width": 256},
             "packed_one_row": {"pack_sequences": True, "pack_width": 16 * 128}}  # the demo's batch x cutoff
MODEL_SETTINGS = {"packed_one_row": {"attn_implementation": "sdpa_packed"}}  # one SDPA call per sample, no mask


def demo_config(seed: int, batching: str, smoke: bool) -> dict[str, Any]:
    """The demo's config with the seed and batching set, nothing written to disk but the config itself."""
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["seed_everything"] = seed
    cfg["trainer"].update(callbacks=[], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
    data = cfg["data"]["init_args"]
    data.update(**BATCHINGS[batching], seed=seed, use_cache=False)
    cfg["model"]["init_args"].update(MODEL_SETTINGS.get(batching, {}))
    if smoke:
        cfg["trainer"].update(max_steps=3, val_check_interval=3)
        data.update(max_test_samples_per_task=2, val_generation_samples_per_task=1)
    return cfg


def one_run(seed: int, batching: str, smoke: bool) -> dict[str, Any]:
    cfg = demo_config(seed, batching, smoke)
    with tempfile.TemporaryDirectory() as tmp:
        cfg["trainer"]["default_root_dir"] = tmp  # the CLI's config.yaml, test_results.json, selection heatmap
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cli = run(["fit", "--config", str(path)])
    data = cfg["data"]["init_args"]
    choice = choice_scoring.choice_accuracy(cli.model.model, cli.datamodule.tokenizer, ROOT / data["dataset_dir"],
                                            TASKS, build_train_prompt, data.get("max_test_samples_per_task"))
    return {"seed": seed, "batching": batching, "grouped": batching == "grouped",
            "generation": cli.model.test_results, "choice": choice}


def _batching(row: dict[str, Any]) -> str:
    return row.get("batching", "grouped" if row["grouped"] else "random")  # rows written before --batchings


def paired(rows: list[dict[str, Any]], metric: str, batching: str = "grouped") -> dict[str, Any]:
    """``batching`` - random, in points, per seed and as a mean with its 95 % t-interval."""
    by = {(r["seed"], _batching(r)): 100 * r[metric]["average"] for r in rows}
    seeds = sorted({s for s, b in by if b == batching})
    diffs = [by[s, batching] - by[s, "random"] for s in seeds]
    return {"per_seed": diffs, **interval(diffs)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batchings", nargs="+", choices=list(BATCHINGS), default=["random", "grouped"],
                    help="random is always run (the pairs' reference)")
    ap.add_argument("--smoke", action="store_true", help="3 steps, 2 test questions per task")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # the demo config's paths are relative to the repository
    torch.set_num_threads(1)
    batchings = ["random", *[b for b in dict.fromkeys(args.batchings) if b != "random"]]
    rows = [one_run(seed, b, args.smoke) for seed in args.seeds for b in batchings]
    result = {"command": " ".join(["benchmarks/grouping_accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
              "torch": torch.__version__, "rows": rows,
              "paired": {b: {m: paired(rows, m, b) for m in ("generation", "choice")} for b in batchings[1:]}}
    if "grouped" in batchings:  # the first study's keys
        result.update(result["paired"]["grouped"])
    for r in rows:
        print(f"seed {r['seed']} {r['batching']:<8}: generation {100 * r['generation']['average']:.1f} %"
              f"  choice {100 * r['choice']['average']:.1f} %", file=sys.stderr)
    for b, by_metric in result["paired"].items():
        for m, d in by_metric.items():
            print(f"{m}: {b} - random {d['mean']:+.1f} points [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]",
                  file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
