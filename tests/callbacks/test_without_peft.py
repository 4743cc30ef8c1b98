"""PEFT is a test dependency only: with ``import peft`` failing, the callback still trains our EffiLoRA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

SCRIPT = f"""
import sys
sys.modules["peft"] = None  # any `import peft` now raises ImportError
sys.path.insert(0, {str(TESTS)!r})
import lightning.pytorch as pl
from helpers import plain_module, token_loader
from effilora_lightning import EffiLoRACallback, EffiLoRAConfig, adapter_parameters
from effilora_lightning.selection import selectable_units

cb = EffiLoRACallback(keep_ratio=0.5, warmup_steps=0, heatmap=False)
trainer = pl.Trainer(max_steps=2, callbacks=[cb], accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
module = plain_module(EffiLoRAConfig(rank=2), layers=2)
trainer.fit(module, token_loader(n=8))
assert [int(s.sum()) for s in cb.history] == [1, 1], cb.history
assert len(adapter_parameters(module)) == len(selectable_units(module).params) + 7  # B + shared A (one per target)
assert not any(name == "peft" or name.startswith("peft.") for name, m in sys.modules.items() if m is not None)
print("ok")
"""


def test_callback_and_helpers_work_without_peft(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
