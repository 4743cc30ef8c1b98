"""Bad checkpoints and checkpoint faults: a checkpoint of another adapter, truncated or empty files, a truncated
base model, a kill -9 in the middle of a write, and the file an interrupted run wrote after last.ckpt."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from effilora_lightning import CausalLMModule, CommonsenseDataModule, EffiLoRAConfig, LoRAConfig
from effilora_lightning.checkpoint_io import AtomicCheckpointIO, remove_stale_temp_files

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "data" / "checkpoints" / "tiny-llama"
DATA = ROOT / "data" / "datasets" / "commonsense"
LORA = dict(rank=4, target_modules=["q_proj", "v_proj"])


def _data() -> CommonsenseDataModule:
    return CommonsenseDataModule(
        data_path=str(DATA / "commonsense_170k.json"), dataset_dir=str(DATA / "dataset"), tokenizer_path=str(TINY),
        cutoff_len=96, batch_size=4, eval_batch_size=8, val_set_size=0, max_test_samples_per_task=1)


def _trainer(root: Path, **kw) -> pl.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", devices=1, default_root_dir=root, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kw)


def _module(adapter) -> CausalLMModule:
    return CausalLMModule(adapter=adapter, model_path=str(TINY))


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory) -> Path:
    """A LoRA (rank 4, q/v) checkpoint after one training step."""
    root = tmp_path_factory.mktemp("lora")
    trainer = _trainer(root, max_steps=1)
    trainer.fit(_module(LoRAConfig(**LORA)), datamodule=_data())
    trainer.save_checkpoint(root / "lora.ckpt")
    return root / "lora.ckpt"


# ---------------------------------------------------------------------------------------------- other adapters
def test_test_with_a_lora_checkpoint_under_an_effilora_config_names_keys_and_the_adapter(lora_ckpt, tmp_path):
    with pytest.raises(ValueError) as error:
        _trainer(tmp_path).test(_module(EffiLoRAConfig(**LORA)), datamodule=_data(), ckpt_path=str(lora_ckpt))
    message = str(error.value)
    assert message.startswith(f"The checkpoint {lora_ckpt} does not fit this model's adapter:")
    assert "keys missing from the checkpoint: model.effilora_shared_a.q_proj" in message
    assert "in the checkpoint but not in the model: model.model.layers.0.self_attn.q_proj.lora_A" in message
    assert "It holds a lora adapter (rank=4, target_modules=['q_proj', 'v_proj']); this model carries a effilora" in message


def test_resuming_a_lora_checkpoint_into_an_effilora_fit_names_the_adapter_not_the_optimizer(lora_ckpt, tmp_path):
    trainer = _trainer(tmp_path, max_steps=3)
    with pytest.raises(ValueError, match=r"does not fit this model's adapter:(.|\n)*It holds a lora adapter"):
        trainer.fit(_module(EffiLoRAConfig(**LORA)), datamodule=_data(), ckpt_path=str(lora_ckpt))
    assert trainer.global_step == 0


def test_other_target_modules_are_named_missing_and_unexpected(lora_ckpt, tmp_path):
    module = _module(LoRAConfig(rank=4, target_modules=["q_proj", "k_proj"]))
    with pytest.raises(ValueError, match=r"missing from the checkpoint: model.model.layers.0.self_attn.k_proj.lora_A"):
        _trainer(tmp_path).test(module, datamodule=_data(), ckpt_path=str(lora_ckpt))


def test_another_rank_is_named_with_both_shapes(lora_ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"of another shape \(checkpoint vs model\): "
                                         r"model.model.layers.0.self_attn.q_proj.lora_A \(4, 64\) vs \(8, 64\)"):
        _trainer(tmp_path).test(_module(LoRAConfig(rank=8, target_modules=LORA["target_modules"])),
                                datamodule=_data(), ckpt_path=str(lora_ckpt))


def test_a_checkpoint_without_the_saved_config_is_judged_by_its_keys(lora_ckpt, tmp_path):
    old = torch.load(lora_ckpt, weights_only=False)
    del old["effilora_lightning"]  # written before the config was saved with the weights
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="It holds lora adapter weights; this model carries a effilora adapter"):
        _trainer(tmp_path).test(_module(EffiLoRAConfig(**LORA)), datamodule=_data(), ckpt_path=str(tmp_path / "old.ckpt"))


def test_the_matching_checkpoint_loads_its_weights(lora_ckpt, tmp_path):
    module = _module(LoRAConfig(**LORA))
    _trainer(tmp_path).test(module, datamodule=_data(), ckpt_path=str(lora_ckpt))
    saved = torch.load(lora_ckpt, weights_only=False)["state_dict"]
    state = module.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())


# ---------------------------------------------------------------------------------------------- broken files
@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["truncated", "empty"])
def test_truncated_or_empty_ckpt_names_the_file(lora_ckpt, tmp_path, keep):
    broken = tmp_path / "broken.ckpt"
    data = lora_ckpt.read_bytes()
    broken.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=rf"The checkpoint {broken} \(\d+ bytes\) is not a complete checkpoint file"):
        _trainer(tmp_path).test(_module(LoRAConfig(**LORA)), datamodule=_data(), ckpt_path=str(broken))


def _model_copy(tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(TINY, out)
    return out


def test_truncated_model_safetensors_names_the_file_and_the_missing_bytes(tmp_path):
    model = _model_copy(tmp_path)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    module = CausalLMModule(adapter=LoRAConfig(**LORA), model_path=str(model))
    with pytest.raises(ValueError, match=rf"{weights} is truncated: {len(data) - 1000} bytes, but its header places "
                                         rf"tensor data up to byte {len(data)}"):
        module.configure_model()


def test_model_safetensors_cut_inside_its_header_names_the_file(tmp_path):
    model = _model_copy(tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{weights} \(100 bytes\) is not a complete safetensors file"):
        CausalLMModule(adapter=LoRAConfig(**LORA), model_path=str(model)).configure_model()


def test_model_config_that_is_not_json_names_the_directory(tmp_path):
    model = _model_copy(tmp_path)
    (model / "config.json").write_text("{ not json")
    with pytest.raises((ValueError, OSError), match=str(model)):
        CausalLMModule(adapter=LoRAConfig(**LORA), model_path=str(model)).configure_model()


# ---------------------------------------------------------------------------------------------- write faults
def test_checkpoints_are_written_beside_the_target_never_in_tmpdir(tmp_path, monkeypatch):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    seen = []
    real_save = torch.save

    def spy(obj, f, *args, **kw):
        seen.append(Path(f.name))
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", spy)
    AtomicCheckpointIO().save_checkpoint({"x": torch.ones(3)}, tmp_path / "ckpt" / "last.ckpt")
    assert seen == [tmp_path / "ckpt" / f".last.ckpt.tmp-{os.getpid()}"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"] and not list(tmpdir.iterdir())


def test_the_module_gives_the_trainer_the_atomic_checkpoint_io(lora_ckpt, tmp_path):
    trainer = _trainer(tmp_path)
    trainer.test(_module(LoRAConfig(**LORA)), datamodule=_data(), ckpt_path=str(lora_ckpt))
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert io.load_checkpoint(target)["step"] == 1


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys, torch
    from effilora_lightning.checkpoint_io import AtomicCheckpointIO

    class DieMidWrite:
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGKILL)

    AtomicCheckpointIO().save_checkpoint({"big": torch.ones(100_000), "then": DieMidWrite()}, sys.argv[1])
""")


def test_kill_9_mid_write_leaves_a_temp_file_beside_the_target_that_the_next_save_removes(tmp_path):
    target = tmp_path / "ckpt" / "last.ckpt"
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], timeout=120,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == -9
    leftovers = [p.name for p in target.parent.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.tmp-")  # not in TMPDIR, no last.ckpt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    AtomicCheckpointIO().save_checkpoint({"step": 3}, target)
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_temp_files_of_running_writers_are_left_alone(tmp_path):
    mine = tmp_path / f".last.ckpt.tmp-{os.getpid()}"
    mine.write_bytes(b"partial")
    assert remove_stale_temp_files(tmp_path) == [] and mine.exists()


def test_resume_from_last_removes_the_file_the_killed_run_wrote_after_it(tmp_path):
    """Lightning writes the top-k file, then last.ckpt: a kill between the two leaves a top-k file the state in
    last.ckpt does not know. Without the sweep it stays next to later ones, and the resumed run writes its own
    step as ...-v1.ckpt beside it."""
    ckpts = tmp_path / "checkpoints"

    def fit(max_steps: int, ckpt_path: str | None = None) -> None:
        callback = ModelCheckpoint(dirpath=ckpts, save_last=True, every_n_train_steps=2)
        _trainer(tmp_path, max_steps=max_steps, callbacks=[callback], enable_checkpointing=True).fit(
            _module(LoRAConfig(**LORA)), datamodule=_data(), ckpt_path=ckpt_path)

    fit(2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    orphan = ckpts / "epoch=0-step=4.ckpt"  # what the killed run wrote at step 4 before last.ckpt
    shutil.copy(ckpts / "last.ckpt", orphan)
    os.utime(orphan, (os.path.getmtime(ckpts / "last.ckpt") + 5,) * 2)
    with pytest.warns(UserWarning, match=rf"Removed {orphan}: written after last.ckpt"):
        fit(6, ckpt_path="last")
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=6.ckpt", "last.ckpt"]


def test_resume_from_an_explicit_older_file_removes_nothing(tmp_path):
    ckpts = tmp_path / "checkpoints"
    callback = ModelCheckpoint(dirpath=ckpts, save_last=True, every_n_train_steps=2)
    _trainer(tmp_path, max_steps=2, callbacks=[callback], enable_checkpointing=True).fit(
        _module(LoRAConfig(**LORA)), datamodule=_data())
    later = ckpts / "epoch=0-step=8.ckpt"
    shutil.copy(ckpts / "last.ckpt", later)
    os.utime(later, (os.path.getmtime(ckpts / "last.ckpt") + 5,) * 2)
    callback = ModelCheckpoint(dirpath=ckpts, save_last=True, every_n_train_steps=2)
    _trainer(tmp_path, max_steps=3, callbacks=[callback], enable_checkpointing=True).fit(
        _module(LoRAConfig(**LORA)), datamodule=_data(), ckpt_path=str(ckpts / "epoch=0-step=2.ckpt"))
    assert later.exists()  # a deliberate branch from an older step: its own files stay


def test_a_truncated_ckpt_is_named_at_setup_under_strategies_that_read_it_themselves(lora_ckpt, tmp_path):
    """FSDP1 and Lightning's ModelParallelStrategy load a .ckpt without the CheckpointIO: setup checks it first."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from effilora_lightning import CausalLMModule, LoRAConfig

    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(Path(lora_ckpt).read_bytes()[:1000])
    module = CausalLMModule(adapter=LoRAConfig(rank=2, target_modules=["q_proj"]), model_path=str(TINY))
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), ckpt_path=str(cut), datamodule=None)
    with pytest.raises(ValueError, match=r"The checkpoint .*cut\.ckpt \(1000 bytes\) is not a complete checkpoint"):
        module.setup("fit")
