"""The benchmark scripts' ``--smoke`` runs: every method gets a row, and the numbers are sane.

Both scripts run in this process (imported from benchmarks/, which is not a package), so torch, transformers
and lightning are imported once: the two together take well under 90 s on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _finite_positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_speed_smoke_has_every_method_with_sane_numbers(tmp_path: Path) -> None:
    speed = _load("speed")
    out = tmp_path / "speed.json"
    speed.main(["--smoke", "--json", str(out)])
    payload = json.loads(out.read_text())
    rows = {r["method"]: r for r in payload["rows"]}
    assert list(rows) == list(speed.METHODS)
    for name, r in rows.items():
        assert _finite_positive(r["step_ms"]) and _finite_positive(r["cpu_ms"]), name
        assert len(r["times_ms"]) == 2, name
        assert _finite_positive(r["peak_mib"]) and r["peak_mib"] >= r["resident_mib"], name
        assert 0 <= r["updated_per_step"] <= r["trainable"], name
    assert rows["floor"]["trainable"] == 0 and rows["floor"]["vs_floor"] == 1.0
    assert rows["peft_lora"]["overhead_vs_peft"] == pytest.approx(1.0)
    assert rows["lora"]["trainable"] == rows["peft_lora"]["trainable"]  # same rank, same targets
    assert rows["effilora_k1.0"]["updated_per_step"] == rows["effilora_k1.0"]["trainable"]
    assert rows["effilora_k0.5"]["updated_per_step"] < rows["effilora_k0.5"]["trainable"]
    assert rows["effilora_k0.5"]["trainable"] < rows["lora"]["trainable"]  # one A for all layers
    assert rows["full_ft"]["trainable"] > rows["hydralora"]["trainable"]
    assert rows["lora"]["peak_mib"] > rows["floor"]["peak_mib"]  # adapters and AdamW state cost memory
    assert set(payload["target"]) >= {"overhead_vs_peft", "memory_ok", "params_ratio"}


def test_quality_smoke_has_every_method_with_sane_numbers(tmp_path: Path) -> None:
    if not (ROOT / "data/tiny-llama/model.safetensors").is_file():
        pytest.skip("data/tiny-llama is not built (python data/make_tiny_llama.py)")
    quality = _load("quality")
    out = tmp_path / "quality.json"
    quality.main(["--smoke", "--json", str(out)])
    payload = json.loads(out.read_text())
    rows = {r["method"]: r for r in payload["rows"]}
    assert list(rows) == [m.name for m in quality.METHODS]
    for name, r in rows.items():
        assert set(r["accuracy"]) >= {"boolq", "piqa", "average"}, name
        assert all(0.0 <= a["mean"] <= 1.0 and a["std"] >= 0.0 for a in r["accuracy"].values()), name
        assert r["trainable"] > 0 and 0 < r["updated_per_step"] <= r["trainable"], name
        assert _finite_positive(r["fit_s"]) and math.isfinite(r["val_loss"]["mean"]), name
    assert rows["effilora_k0.5"]["updated_per_step"] < rows["effilora_k1.0"]["updated_per_step"]
    assert rows["effilora_k1.0"]["trainable"] < rows["lora"]["trainable"]
    assert len(payload["runs"]) == len(quality.METHODS)  # smoke: one seed, one learning rate

