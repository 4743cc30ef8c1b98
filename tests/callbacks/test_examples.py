"""The runnable examples in callbacks/ run as shipped (fewer steps), and leave what they promise."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "callbacks"
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script, adapter_file", [
    ("effilora_example.py", "adapter_model.safetensors"),
    ("peft_lora_example.py", "adapter_model.safetensors"),
])
def test_example_trains_and_saves_its_adapter(script, adapter_file, tmp_path, monkeypatch, capsys):
    pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)  # the examples write under ./logs
    namespace = runpy.run_path(str(EXAMPLES / script), run_name="example")
    namespace["main"](max_steps=3)
    assert "selection per step" in capsys.readouterr().out
    assert len(list(tmp_path.glob(f"logs/*/adapter/{adapter_file}"))) == 1
