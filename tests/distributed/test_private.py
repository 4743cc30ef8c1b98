"""Every private torch/Lightning name the project reads (effilora_lightning/distributed/private.py), exercised on
real objects, and the versions they were checked against. A failure here after an upgrade means: re-check
private.py against the new release, fix what moved, then extend VERIFIED_WITH."""

from __future__ import annotations

from importlib import metadata

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.compile import from_compiled
from torch import nn

from effilora_lightning.distributed import private


@pytest.mark.parametrize("package", sorted(private.VERIFIED_WITH))
def test_installed_versions_are_the_ones_private_reads_were_checked_against(package):
    installed = ".".join(metadata.version(package).split(".")[:2])
    assert installed in private.VERIFIED_WITH[package], (
        f"{package} {metadata.version(package)} is installed, but effilora_lightning/distributed/private.py was "
        f"checked against {package} {private.VERIFIED_WITH[package]} only. Re-check every private name it reads "
        "against this release (the other tests in this file exercise each), then add the version to VERIFIED_WITH."
    )


def test_torch_module_and_tensor_internals():
    layer = nn.Linear(2, 2)
    assert not private.has_forward_hooks(layer)
    handle = layer.register_forward_pre_hook(lambda *_: None)
    assert private.has_forward_hooks(layer)
    handle.remove()
    layer.register_forward_hook(lambda *_: None)
    assert private.has_forward_hooks(layer)
    t = torch.zeros(4)
    assert not private.is_view(t) and private.is_view(t[:2])
    module = nn.Module()
    module.register_buffer("kept", torch.zeros(1))
    module.register_buffer("inv_freq", torch.zeros(1), persistent=False)
    assert private.non_persistent_buffer_names(module) == {"inv_freq"}
    assert hasattr(module, "_non_persistent_buffers_set")  # the accessor's default must never hide a rename


def test_compiled_modules_are_recognised_both_ways():
    plain = nn.Linear(2, 2)
    assert not private.is_compiled(plain)
    plain.compile()  # nn.Module.compile -> _compiled_call_impl
    assert private.is_compiled(plain)
    module = pl.LightningModule()
    assert not private.is_compiled(module)
    assert private.is_compiled(from_compiled(torch.compile(module)))  # Lightning's _compiler_ctx


def test_lightning_module_and_strategy_internals():
    module = pl.LightningModule()
    assert hasattr(module, "_trainer") and hasattr(module, "_device_mesh")
    assert private.attached_trainer(module) is None and private.device_mesh_of(module) is None
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    module.trainer = trainer
    assert private.attached_trainer(module) is trainer
    assert private.ddp_finds_unused_parameters(DDPStrategy(find_unused_parameters=True))
    assert not private.ddp_finds_unused_parameters(DDPStrategy())
    assert private.fsdp1_state_dict_type(FSDPStrategy(state_dict_type="sharded")) == "sharded"
    assert hasattr(FSDPStrategy(), "_state_dict_type")
    assert private.saves_distributed_checkpoint(ModelParallelStrategy())
    assert not private.saves_distributed_checkpoint(ModelParallelStrategy(save_distributed_checkpoint=False))
    assert private.precision_compute_dtype(MixedPrecision("bf16-mixed", "cpu")) is torch.bfloat16
    assert private.precision_compute_dtype(Precision()) is torch.float32


def test_no_other_module_reads_a_private_name_of_torch_or_lightning():
    """The rule this file enforces: private reads live in private.py only (grep for the ones we know of)."""
    import re
    from pathlib import Path

    package = Path(private.__file__).resolve().parents[1]
    names = ("_ddp_kwargs", "_compiler_ctx", "_compiled_call_impl", "_plugin_to_compute_dtype", "_state_dict_type",
             "_save_distributed_checkpoint", "_non_persistent_buffers_set", "_forward_hooks", "_forward_pre_hooks",
             "_base", "_device_mesh", "_trainer")
    read = re.compile(r"""(?:\.|["'])(""" + "|".join(names) + r")\b")  # attribute access or a getattr string
    offenders = [f"{path.relative_to(package)}: {match}" for path in sorted(package.rglob("*.py"))
                 if path.name != "private.py" for match in read.findall(path.read_text(encoding="utf-8"))]
    assert offenders == []
