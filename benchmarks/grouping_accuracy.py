"""Does length-grouped batching cost accuracy? The commonsense demo with and without ``group_by_length``, paired seeds.

    .venv/bin/python benchmarks/grouping_accuracy.py --seeds 0 1 2 --json benchmarks/results/grouping_accuracy_cpu.json
    .venv/bin/python benchmarks/grouping_accuracy.py --smoke --json /tmp/grouping_smoke.json        # seconds

Each run is ``effilora fit --config configs/demo/commonsense_effilora.yaml`` (through ``effilora_lightning.cli.run``,
the product's own path) with the seed set for both ``seed_everything`` and the data module, and
``group_by_length`` false or true; no checkpoints or logs. Two accuracies per run on the 8 test sets: greedy
generation (the module's test, LLM-Adapters' scoring) and the teacher-forced choice of ``choice_scoring`` (which
answer of the "Answer format" line the model finds likeliest). Reported: per seed, and the seed-paired difference
grouped - random (mean, 95 % t-interval).
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


def demo_config(seed: int, grouped: bool, smoke: bool) -> dict[str, Any]:
    """The demo's config with the seed and grouping set, nothing written to disk but the config itself."""
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["seed_everything"] = seed
    cfg["trainer"].update(callbacks=[], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
    data = cfg["data"]["init_args"]
    data.update(group_by_length=grouped, seed=seed, use_cache=False)
    if smoke:
        cfg["trainer"].update(max_steps=3, val_check_interval=3)
        data.update(max_test_samples_per_task=2, val_generation_samples_per_task=1)
    return cfg


def one_run(seed: int, grouped: bool, smoke: bool) -> dict[str, Any]:
    cfg = demo_config(seed, grouped, smoke)
    with tempfile.TemporaryDirectory() as tmp:
        cfg["trainer"]["default_root_dir"] = tmp  # the CLI's config.yaml, test_results.json, selection heatmap
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cli = run(["fit", "--config", str(path)])
    data = cfg["data"]["init_args"]
    choice = choice_scoring.choice_accuracy(cli.model.model, cli.datamodule.tokenizer, ROOT / data["dataset_dir"],
                                            TASKS, build_train_prompt, data.get("max_test_samples_per_task"))
    return {"seed": seed, "grouped": grouped, "generation": cli.model.test_results, "choice": choice}


def paired(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """grouped - random, in points, per seed and as a mean with its 95 % t-interval."""
    by = {(r["seed"], r["grouped"]): 100 * r[metric]["average"] for r in rows}
    seeds = sorted({s for s, _ in by})
    diffs = [by[s, True] - by[s, False] for s in seeds]
    return {"per_seed": diffs, **interval(diffs)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--smoke", action="store_true", help="3 steps, 2 test questions per task")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # the demo config's paths are relative to the repository
    torch.set_num_threads(1)
    rows = [one_run(seed, grouped, args.smoke) for seed in args.seeds for grouped in (False, True)]
    result = {"command": " ".join(["benchmarks/grouping_accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
              "torch": torch.__version__, "rows": rows,
              "generation": paired(rows, "generation"), "choice": paired(rows, "choice")}
    for r in rows:
        print(f"seed {r['seed']} grouped {r['grouped']!s:<5}: generation {100 * r['generation']['average']:.1f} %"
              f"  choice {100 * r['choice']['average']:.1f} %", file=sys.stderr)
    for m in ("generation", "choice"):
        d = result[m]
        print(f"{m}: grouped - random {d['mean']:+.1f} points [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]",
              file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
