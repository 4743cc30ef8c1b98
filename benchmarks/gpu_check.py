"""Everything one H200 should tell us, in one command and at most 8 minutes: the GPU tests, the 8B-shaped speed
table, the commonsense demo on the GPU, the chunked-loss memory check, the AdamW implementations' step time and
packed batches' tokens/s.

    bash benchmarks/gpu_check.sh OUT                    # on the GPU machine (python3 = the image's python)
    .venv/bin/python benchmarks/gpu_check.py OUT --dry-run          # the same script on the CPU, tiny presets
    python3 benchmarks/gpu_check.py OUT --only speed demo          # some steps again (a rerun)

Steps, in order; each runs in a child process with a time limit, is timed, and writes OUT/<step>.json (status
``ok``, ``failed``, ``timeout`` or ``skipped``, seconds, the command, the end of its output, and what it
measured); the environment step's record goes into summary.json instead, to stay within the 8 files the device
tool returns. A failing step is recorded and the next one still runs. OUT also gets summary.json (every step's
status and headline figures, and the environment) and log.txt (everything printed).

    environment   install the wheels of .gpu_wheels/ (benchmarks/fetch_gpu_wheels.sh) into a folder on
                  PYTHONPATH, put the repository on PYTHONPATH, check the product imports; record python, torch,
                  CUDA, the GPU, nvidia-smi and the packages' versions
    pytest_gpu    ``pytest -m gpu`` (tests/gpu and any other gpu-marked test); the JUnit report as JSON
    speed         benchmarks/speed.py --device cuda: LLaMA-3-8B shapes (all 32 layers), bf16, batch 2 x 2048: floor,
                  PEFT LoRA, our LoRA, EffiLoRA keep 1.0 / 0.5 with share_a_by target and in_features, and EffiLoRA
                  keep 0.5 with bf16 adapters (the in-place add's path); step time, tokens/s, MFU against the 4N
                  floor, peak memory
    demo          configs/demo/commonsense_effilora.yaml on accelerator gpu, precision bf16-mixed, to the end:
                  the per-task accuracy table, validation accuracy and the perf/* metrics from its CSV log
    loss_memory   benchmarks/loss_memory.py --device cuda --json ... (chunked LM-head loss against HF's plain
                  loss: peak memory and step time) when that script exists (else skipped)
    optimizer     benchmarks/optimizer_step.py --device cuda: one AdamW step over the demo adapters' and LLaMA-3-8B
                  LoRA rank 16's parameters, fused (the modules' default) / foreach (torch's CUDA default) / for
                  loop, interleaved, ratios with intervals, and what each computes against the for loop
    packing       benchmarks/padding.py --device cuda --shape llama3-8b-2layers: two decoder layers of LLaMA-3-8B's
                  widths, bf16-mixed, batch 16 of the commonsense length mix at cutoff 256; non-padding tokens/s of
                  grouped, packed (rows of 2x / 1x the cutoff, sdpa's block mask) and one row under sdpa_packed,
                  each over random batches, paired per round

``--dry-run`` runs all of it on the CPU with tiny presets: the wheels (if fetched) installed into a scratch
folder but not used (this machine's venv has every package), ``pytest -m gpu`` (every GPU test skips: ok),
speed.py on its smoke preset, the demo for 4 steps with a small test set, loss_memory.py with its smallest
preset, optimizer_step.py on the demo's EffiLoRA set for 2 rounds, padding.py on the demo model for 1 round.
tests/benchmarks/test_gpu_check.py runs it in CI, so the script that meets the GPU has run end to end.

Only the standard library is imported here: the checks must run even where an import of the product fails.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".gpu_wheels"
DEMO_CONFIG = REPO / "configs" / "demo" / "commonsense_effilora.yaml"
LOSS_MEMORY = REPO / "benchmarks" / "loss_memory.py"
STEPS = ["environment", "pytest_gpu", "speed", "demo", "loss_memory", "optimizer", "packing"]
OWN_FILE = [s for s in STEPS if s != "environment"]  # steps with an OUT/<step>.json (module docstring)
BUDGET_S = 480  # the issue's 8 minutes, on the GPU
LIMITS_S = {"environment": 90, "pytest_gpu": 210, "speed": 240, "demo": 180, "loss_memory": 120, "optimizer": 60,
            "packing": 120}
# The dry run's limits only catch hangs: on a shared 2-core box under load each child's imports alone take 10-20 s.
DRY_BUDGET_S = 1500
DRY_LIMITS_S = {"environment": 180, "pytest_gpu": 300, "speed": 300, "demo": 360, "loss_memory": 360,
                "optimizer": 180, "packing": 300}
SPEED_METHODS = ["floor", "peft_lora", "lora", "effilora_k1.0", "effilora_k0.5", "effilora_in_k1.0", "effilora_in_k0.5",
                 "effilora_k0.5_bf16"]
TAIL = 6000  # characters of a child's output kept in its step's JSON (the whole of it is in log.txt)


class Run:
    """One gpu_check run: where things go, the child processes' environment, the clock."""

    def __init__(self, out: Path, work: Path, dry_run: bool, budget: float) -> None:
        self.out, self.work, self.dry_run = out, work, dry_run
        self.deadline = time.monotonic() + budget
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg",
                        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        self.pythonpath: list[str] = [str(REPO)]
        self._log = open(out / "log.txt", "a", buffering=1)
        self.set_pythonpath()

    def set_pythonpath(self, first: list[str] = ()) -> None:
        self.pythonpath = [*first, *[p for p in self.pythonpath if p not in first]]
        rest = os.environ.get("PYTHONPATH", "")
        self.env["PYTHONPATH"] = os.pathsep.join(self.pythonpath + ([rest] if rest else []))

    def log(self, text: str) -> None:
        print(text, flush=True)
        self._log.write(text + "\n")

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def child(self, cmd: list[str], limit: float, cwd: Path = REPO) -> dict[str, Any]:
        """Run ``cmd`` (its output echoed to the log as it comes), at most ``limit`` seconds."""
        self.log(f"$ {' '.join(cmd)}")
        started = time.monotonic()
        lines: list[str] = []
        proc = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        timed_out = False
        try:
            _pump(proc, lines, self._log, started + limit)
        except TimeoutError:
            timed_out = True
            _kill(proc)
        rc = proc.wait()
        text = "".join(lines)
        return {"cmd": cmd, "rc": rc, "timed_out": timed_out, "seconds": round(time.monotonic() - started, 2),
                "output_tail": text[-TAIL:], "_output": text}


def _pump(proc: subprocess.Popen, lines: list[str], log, deadline: float) -> None:
    """Copy the child's output as it comes (raw reads: a line left unfinished cannot block us) until it exits;
    TimeoutError at ``deadline``."""
    import codecs
    import selectors

    fd = proc.stdout.fileno()
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        if not sel.select(timeout=min(left, 5.0)):
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        text = decode(chunk)
        lines.append(text)
        log.write(text)
        sys.stdout.write(text)
        sys.stdout.flush()


def _kill(proc: subprocess.Popen) -> None:
    """End the child and everything it started (its own process session, started for this)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------- steps
def step_environment(run: Run) -> dict[str, Any]:
    """Wheels -> a site folder on PYTHONPATH (GPU only), then what is installed and whether the product imports."""
    result: dict[str, Any] = {"repo": str(REPO), "python": sys.version, "executable": sys.executable,
                              "platform": platform.platform(), "dry_run": run.dry_run}
    result["wheels"] = install_wheels(run)
    problems = [] if result["wheels"].get("ok") else [f"wheels: {result['wheels'].get('error')}"]
    probe = run.child([sys.executable, "-c", _PROBE], limit=min(60, run.remaining()))
    try:
        facts = json.loads(probe["_output"].strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        facts = {"error": "the probe printed no JSON", "rc": probe["rc"]}
    result["probe"] = facts
    result["probe_output_tail"] = probe["output_tail"][-2000:]
    if facts.get("import_errors"):
        problems.append(f"imports: {facts['import_errors']}")
    if not run.dry_run and not facts.get("cuda_available"):
        problems.append("torch sees no CUDA device")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,"
                              "clocks.max.sm,power.draw,temperature.gpu,utilization.gpu", "--format=csv"],
                             capture_output=True, text=True, timeout=30)
        result["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    result["pythonpath"] = run.env["PYTHONPATH"]
    result["status"] = "failed" if problems else "ok"
    result["problems"] = problems
    return result


_PROBE = r"""
import importlib, importlib.metadata as md, json, sys
out = {"import_errors": {}}
for mod in ("torch", "lightning", "transformers", "peft", "torchmetrics", "open_clip", "jsonargparse", "tiktoken",
            "effilora_lightning", "effilora_lightning.cli", "effilora_lightning.models"):
    try:
        importlib.import_module(mod)
    except Exception as e:
        out["import_errors"][mod] = f"{type(e).__name__}: {e}"
versions = {}
for pkg in ("torch", "torchvision", "lightning", "transformers", "peft", "torchmetrics", "open_clip_torch",
            "jsonargparse", "docstring_parser", "typeshed_client", "ftfy", "wcwidth", "tiktoken", "timm", "safetensors",
            "tokenizers", "huggingface_hub", "pytest", "pytest-timeout", "numpy", "matplotlib", "triton"):
    try:
        versions[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
        versions[pkg] = None
out["versions"] = versions
try:
    from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE as sig
    out["lightning_cli_signatures"] = bool(sig)
except Exception as e:
    out["lightning_cli_signatures"] = f"{type(e).__name__}: {e}"
try:
    import torch
    out["cuda_available"] = torch.cuda.is_available()
    out["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": torch.cuda.get_device_name(0), "capability": f"{p.major}.{p.minor}",
                      "memory_gib": p.total_memory / 2**30, "sms": p.multi_processor_count,
                      "bf16": torch.cuda.is_bf16_supported(), "count": torch.cuda.device_count()}
        from lightning.fabric.utilities.throughput import get_available_flops
        out["lightning_bf16_peak_flops"] = get_available_flops(torch.device("cuda", 0), torch.bfloat16)
except Exception as e:
    out["torch_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def install_wheels(run: Run) -> dict[str, Any]:
    """pip install --no-index the fetched wheels into WORK/site (checked against SHA256SUMS first). On the GPU the
    folder goes first on PYTHONPATH; in a dry run the install is exercised and the folder left unused."""
    if not WHEELS.is_dir() or not list(WHEELS.glob("*.whl")):
        if run.dry_run:
            return {"ok": True, "note": f"no {WHEELS.name}/ here (bash benchmarks/fetch_gpu_wheels.sh); dry run: "
                    "this machine's venv has the packages"}
        return {"ok": False, "error": f"no wheels in {WHEELS}: run bash benchmarks/fetch_gpu_wheels.sh on the CPU box "
                "and carry .gpu_wheels with the device tool"}
    wheels = sorted(WHEELS.glob("*.whl"))
    sums = WHEELS / "SHA256SUMS"
    bad = []
    if sums.is_file():
        for line in sums.read_text().splitlines():
            digest, name = line.split(maxsplit=1)
            path = WHEELS / name.strip().removeprefix("./")
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                bad.append(path.name)
    site = run.work / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(site), *map(str, wheels)]
    done = run.child(cmd, limit=min(120, run.remaining()))
    ok = done["rc"] == 0 and not bad
    if ok and not run.dry_run:
        run.set_pythonpath([str(site)])
    return {"ok": ok, "wheels": [w.name for w in wheels], "checksum_mismatch": bad, "site": str(site),
            "used": ok and not run.dry_run, "seconds": done["seconds"], "pip_output_tail": done["output_tail"][-1500:],
            **({} if ok else {"error": f"pip rc {done['rc']}, checksum mismatch {bad}"})}


def step_pytest_gpu(run: Run, limit: float) -> dict[str, Any]:
    junit = run.work / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={junit}", "-o", "junit_family=xunit1"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "330"]  # per test; the FSDP launches have their own 300 s limit
    done = run.child(cmd, limit)
    report = parse_junit(junit) if junit.is_file() else {"error": "no JUnit report written"}
    counts = report.get("counts", {})
    bad = counts.get("failed", 0) + counts.get("error", 0)
    if run.dry_run:  # on the CPU every GPU test skips; pytest's rc is then 0
        ok = done["rc"] == 0 and bad == 0 and counts.get("total", 0) > 0
    else:
        ok = done["rc"] == 0 and bad == 0 and counts.get("passed", 0) > 0
    return {**_public(done), "status": _status(done, ok), "report": report}


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and one row per test (outcome, seconds, the first line of any message) from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                message = (child.get("message") or child.text or "").strip().splitlines()[0:1]
                message = message[0][:300] if message else ""
                kind = child.get("type", "")
                outcome = {"failure": "failed", "error": "error"}.get(child.tag) or (
                    "xfailed" if "xfail" in kind else "skipped")
        tests.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0) or 0), "message": message})
    counts: dict[str, int] = {"total": len(tests)}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"counts": counts, "tests": tests}


def step_speed(run: Run, limit: float) -> dict[str, Any]:
    raw = run.work / "speed_raw.json"
    if run.dry_run:
        args = ["--device", "cpu", "--preset", "smoke", "--reps", "2", "--warmup", "1", "--peak-tflops", "1"]
        shape = "dry run: speed.py's smoke preset (2 layers, 64 wide) on the CPU; MFU against a made-up 1 TFLOP/s"
    else:
        args = ["--device", "cuda", "--preset", "llama3-8b", "--reps", "10", "--warmup", "3"]
        shape = ("LLaMA-3-8B shapes, all 32 layers (not fewer), bf16 base, batch 2 x 2048 tokens, rank 16 on the "
                 "seven projections; adapters fp32 except the _bf16 row")
    cmd = [sys.executable, str(REPO / "benchmarks" / "speed.py"), *args, "--methods", *SPEED_METHODS,
           "--json", str(raw)]
    done = run.child(cmd, limit)
    payload = json.loads(raw.read_text()) if raw.is_file() else None
    ok = done["rc"] == 0 and payload is not None and len(payload.get("rows", [])) == len(SPEED_METHODS)
    headline = None
    if payload:
        headline = [{k: r.get(k) for k in ("method", "step_ms", "iqr_ms", "overhead_vs_peft", "tokens_per_s", "mfu_4n",
                                           "mfu_4n_vs_matmul", "mfu", "peak_mib", "cuda_max_allocated_mib",
                                           "trainable", "updated_per_step")} for r in payload.get("rows", [])]
    return {**_public(done), "status": _status(done, ok), "shape": shape, "rows": headline,
            "target": payload and payload.get("target"), "result": payload}


def demo_config(run: Run) -> tuple[Path, str]:
    """The demo's YAML with accelerator gpu (cpu in a dry run), bf16-mixed, logs and checkpoints under WORK; in a
    dry run also 4 steps, a validation after 2 and 2 test questions per task."""
    import yaml  # PyYAML: on the GPU machine and in the venv (jsonargparse needs it)

    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    trainer = cfg["trainer"]
    trainer["accelerator"] = "cpu" if run.dry_run else "gpu"
    trainer["precision"] = "bf16-mixed"
    trainer["logger"]["init_args"]["save_dir"] = str(run.work / "logs")
    trainer["enable_progress_bar"] = False
    for cb in trainer.get("callbacks", []):
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(run.work / "demo_checkpoints")
    if run.dry_run:
        trainer.update(max_steps=4, val_check_interval=2, log_every_n_steps=1)
        for cb in trainer.get("callbacks", []):
            if cb["class_path"].endswith("ModelCheckpoint"):
                cb["init_args"]["every_n_train_steps"] = 2
        cfg["data"]["init_args"].update(val_set_size=16, val_generation_samples_per_task=1, max_test_samples_per_task=2)
        cfg["model"]["init_args"]["selection"]["warmup_steps"] = 1
        cfg["model"]["init_args"]["log_every_n_steps"] = 1
    path = run.work / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, trainer["logger"]["init_args"]["name"]


def step_demo(run: Run, limit: float) -> dict[str, Any]:
    config, name = demo_config(run)
    cmd = [sys.executable, "-m", "effilora_lightning", "fit", "--config", str(config)]
    done = run.child(cmd, limit)
    versions = sorted((run.work / "logs" / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    log_dir = versions[-1] if versions else None
    results = json.loads((log_dir / "test_results.json").read_text()) if log_dir and (log_dir / "test_results.json").is_file() else None
    table = _accuracy_table(done["_output"])
    metrics = _csv_summary(log_dir / "metrics.csv") if log_dir and (log_dir / "metrics.csv").is_file() else {}
    ok = done["rc"] == 0 and results is not None and "average" in results.get("accuracy", {})
    return {**_public(done), "status": _status(done, ok), "config": config.read_text(), "log_dir": str(log_dir),
            "test_results": results, "accuracy_table": table, "metrics": metrics,
            "heatmap_written": bool(log_dir and (log_dir / "effilora_selection.png").is_file())}


def _accuracy_table(text: str) -> str | None:
    """The last markdown table printed by the test epoch (| task | accuracy (%) | n | ...)."""
    blocks = re.findall(r"(\| task \| accuracy \(%\) \|.*?(?:\n\|[^\n]*)+)", text)
    return blocks[-1].strip() if blocks else None


def _csv_summary(path: Path) -> dict[str, Any]:
    """From Lightning's CSV log: every val_acc with its step, and the last value of each perf/* and effilora/*."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, Any] = {"val_acc": [], "last": {}}
    for row in rows:
        if row.get("val_acc"):
            out["val_acc"].append({"step": row.get("step"), "val_acc": float(row["val_acc"])})
        for key, value in row.items():
            if value and key and (key.startswith(("perf/", "effilora/")) or key in ("train_loss", "val_loss")):
                out["last"][key] = float(value)
    return out


def step_loss_memory(run: Run, limit: float) -> dict[str, Any]:
    """benchmarks/loss_memory.py (another change's script): its JSON flag (--out or --json) and, in a dry run, its
    smallest preset (--smoke ...) are read off its source, so that no extra process is spent on --help."""
    if not LOSS_MEMORY.is_file():
        return {"status": "skipped", "reason": f"{LOSS_MEMORY.relative_to(REPO)} does not exist (yet)"}
    source = LOSS_MEMORY.read_text()
    raw = run.work / "loss_memory_raw.json"
    out_flag = "--out" if '"--out"' in source else "--json"
    args = ["--device", "cpu" if run.dry_run else "cuda", out_flag, str(raw)]
    if run.dry_run:
        args += [next((f for f in ("--smoke", "--dry-run", "--tiny", "--quick") if f'"{f}"' in source), "--smoke")]
    done = run.child([sys.executable, str(LOSS_MEMORY), *args], limit)
    payload = json.loads(raw.read_text()) if raw.is_file() else None
    ok = done["rc"] == 0 and payload is not None
    return {**_public(done), "status": _status(done, ok), "result": payload}


def step_optimizer(run: Run, limit: float) -> dict[str, Any]:
    raw = run.work / "optimizer_raw.json"
    if run.dry_run:
        args = ["--device", "cpu", "--sets", "demo-effilora-r8", "--rounds", "2", "--steps", "1"]
    else:
        args = ["--device", "cuda", "--rounds", "30", "--steps", "10"]
    done = run.child([sys.executable, str(REPO / "benchmarks" / "optimizer_step.py"), *args, "--out", str(raw)], limit)
    payload = json.loads(raw.read_text()) if raw.is_file() else None
    ok = done["rc"] == 0 and payload is not None
    headline = payload and {name: {"ms_per_step_median": r["ms_per_step_median"],
                                   "for_loop_over_fused": r["for_loop_over_fused"],
                                   "for_loop_over_foreach": r["for_loop_over_foreach"],
                                   "foreach_bit_identical": r["agreement"]["foreach"]["bit_identical_to_for_loop"],
                                   "fused_max_abs_diff": r["agreement"]["fused"]["max_abs_diff"]}
                            for name, r in payload["sets"].items()}
    return {**_public(done), "status": _status(done, ok), "sets": headline, "result": payload}


def step_packing(run: Run, limit: float) -> dict[str, Any]:
    raw = run.work / "packing_raw.json"
    common = ["--timing-only", "--batch-sizes", "16", "--out", str(raw)]
    if run.dry_run:
        args = ["--device", "cpu", "--shape", "demo", "--records", "400", "--rounds", "1", "--steps", "1"]
    else:
        args = ["--device", "cuda", "--shape", "llama3-8b-2layers", "--records", "4000", "--rounds", "16",
                "--steps", "4"]
    done = run.child([sys.executable, str(REPO / "benchmarks" / "padding.py"), *args, *common], limit)
    payload = json.loads(raw.read_text()) if raw.is_file() else None
    timed = (payload or {}).get("timed", {}).get("16")
    ok = done["rc"] == 0 and timed is not None
    headline = timed and {b: {"ratio_median": timed[b]["ratio_median"], "ratio_95": timed[b]["ratio_95"],
                              "position_ceiling": timed["position_ratio_random_over"][b]}
                          for b in timed if isinstance(timed[b], dict) and "ratio_median" in timed[b]}
    return {**_public(done), "status": _status(done, ok), "ratios_over_random": headline, "result": payload}


def _status(done: dict[str, Any], ok: bool) -> str:
    return "timeout" if done["timed_out"] else ("ok" if ok else "failed")


def _public(done: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in done.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------- main
def run_step(run: Run, name: str, fn: Callable[..., dict[str, Any]], limits: dict[str, float]) -> dict[str, Any]:
    started = time.monotonic()
    limit = min(limits[name], run.remaining())
    run.log(f"\n===== {name} (limit {limit:.0f} s, {run.remaining():.0f} s left of the budget) =====")
    if limit < 15:
        result = {"status": "skipped", "reason": f"only {run.remaining():.0f} s of the budget left"}
    else:
        try:
            result = fn(run) if name == "environment" else fn(run, limit)
        except Exception as e:  # a bug here must not cost the other steps
            import traceback

            result = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    result = {"step": name, "status": result.pop("status"), "seconds": round(time.monotonic() - started, 2), **result}
    if name in OWN_FILE:
        (run.out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    run.log(f"===== {name}: {result['status']} in {result['seconds']:.1f} s =====")
    return result


def summarise(results: list[dict[str, Any]], run: Run, started: float) -> dict[str, Any]:
    by = {r["step"]: r for r in results}
    summary: dict[str, Any] = {"dry_run": run.dry_run, "seconds": round(time.monotonic() - started, 1),
                               "steps": {r["step"]: {"status": r["status"], "seconds": r["seconds"]} for r in results}}
    env = by.get("environment", {}).get("probe", {})
    summary["gpu"], summary["versions"] = env.get("gpu"), env.get("versions")
    summary["environment"] = by.get("environment")
    if "pytest_gpu" in by:
        summary["pytest_gpu"] = by["pytest_gpu"].get("report", {}).get("counts")
        summary["pytest_gpu_not_passed"] = [t for t in by["pytest_gpu"].get("report", {}).get("tests", [])
                                            if t["outcome"] in ("failed", "error", "xfailed")]
    if "speed" in by:
        summary["speed"] = {"shape": by["speed"].get("shape"), "rows": by["speed"].get("rows"),
                            "target": by["speed"].get("target")}
    if "demo" in by:
        summary["demo"] = {"accuracy_table": by["demo"].get("accuracy_table"),
                           "val_acc": by["demo"].get("metrics", {}).get("val_acc")}
    if "loss_memory" in by:
        summary["loss_memory"] = by["loss_memory"].get("result") or by["loss_memory"].get("reason")
    if "optimizer" in by:
        summary["optimizer"] = by["optimizer"].get("sets")
    if "packing" in by:
        summary["packing"] = by["packing"].get("ratios_over_random")
    return summary


def print_summary(summary: dict[str, Any], run: Run) -> None:
    run.log("\n===== gpu_check summary =====")
    for name, s in summary["steps"].items():
        run.log(f"{name:12s} {s['status']:8s} {s['seconds']:7.1f} s")
    if summary.get("pytest_gpu"):
        run.log(f"pytest -m gpu: {summary['pytest_gpu']}")
        for t in summary.get("pytest_gpu_not_passed", []):
            run.log(f"  {t['outcome']}: {t['test']}: {t['message'][:160]}")
    speed = summary.get("speed") or {}
    if speed.get("rows"):
        run.log(f"speed ({speed['shape']}):")
        run.log("| method | step ms | overhead / PEFT's | tokens/s | MFU 4N | MFU 4N / matmul | peak MiB |")
        run.log("|---|---:|---:|---:|---:|---:|---:|")
        for r in speed["rows"]:
            run.log(f"| {r['method']} | {_f(r['step_ms'], '.1f')} | {_f(r['overhead_vs_peft'], '.2f')} | "
                    f"{_f(r['tokens_per_s'], ',.0f')} | {_f(r.get('mfu_4n'), '.3f')} | "
                    f"{_f(r.get('mfu_4n_vs_matmul'), '.3f')} | {_f(r.get('peak_mib'), ',.0f')} |")
        run.log(f"target (effilora_k0.5): {json.dumps(speed.get('target'))}")
    for name, r in (summary.get("optimizer") or {}).items():
        fused, foreach = r["for_loop_over_fused"], r["for_loop_over_foreach"]
        run.log(f"AdamW step, {name}: for_loop / fused {fused['median']:.2f} ({fused['ratio_95'][0]:.2f}-"
                f"{fused['ratio_95'][1]:.2f}), for_loop / foreach {foreach['median']:.2f} ({foreach['ratio_95'][0]:.2f}-"
                f"{foreach['ratio_95'][1]:.2f}); ms " + ", ".join(f"{k} {v:.3f}" for k, v in r["ms_per_step_median"].items()))
    for batching, r in (summary.get("packing") or {}).items():
        run.log(f"packing, tokens/s over random: {batching} {r['ratio_median']:.2f} ({r['ratio_95'][0]:.2f}-"
                f"{r['ratio_95'][1]:.2f}; positions ceiling {r['position_ceiling']:.2f})")
    demo = summary.get("demo") or {}
    if demo.get("accuracy_table"):
        run.log("demo accuracy:\n" + demo["accuracy_table"])
    run.log(f"total {summary['seconds']:.0f} s; per-step JSON, summary.json and log.txt in {run.out}")


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder (created; each step writes <step>.json there)")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, tiny presets: everything but CUDA itself")
    ap.add_argument("--only", nargs="+", choices=STEPS, help="run these steps (environment always runs first)")
    ap.add_argument("--skip", nargs="+", choices=STEPS, default=[], help="leave these steps out")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for everything (default {BUDGET_S}; with --dry-run {DRY_BUDGET_S})")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = DRY_BUDGET_S if args.dry_run else BUDGET_S
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    run = Run(out, work, args.dry_run, args.budget)
    chosen = [s for s in STEPS if (args.only is None or s in args.only or s == "environment") and s not in args.skip]
    run.log(f"gpu_check{' --dry-run' if args.dry_run else ''}: steps {chosen}, budget {args.budget:.0f} s, "
            f"out {out}, scratch {work}")
    fns = {"environment": step_environment, "pytest_gpu": step_pytest_gpu, "speed": step_speed, "demo": step_demo,
           "loss_memory": step_loss_memory, "optimizer": step_optimizer, "packing": step_packing}
    limits = DRY_LIMITS_S if args.dry_run else LIMITS_S
    results = [run_step(run, name, fns[name], limits) for name in chosen]
    summary = summarise(results, run, started)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print_summary(summary, run)
    return 0 if all(r["status"] in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
