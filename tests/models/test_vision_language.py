"""VisionLanguageModule on the bundled tiny tower and LLaMA: placement of image features, label masks,
adapters only on the LLM, text-only samples, and the stage-1 -> stage-2 projector hand-over."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from effilora_lightning import EffiLoRAConfig, LoRAConfig, VisionLanguageModule, VisualInstructionDataModule
from effilora_lightning.adapters import AdapterLinear, is_adapter_param
from effilora_lightning.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX

ROOT = Path(__file__).resolve().parents[2]
TOWER = dict(vision_tower="effilora-tiny-vit", vision_pretrained=str(ROOT / "data/checkpoints/tiny-clip/open_clip_model.safetensors"))


def _module(adapter=None, **kw) -> VisionLanguageModule:
    module = VisionLanguageModule(adapter=adapter, model_path=str(ROOT / "data/checkpoints/tiny-llama"), **TOWER, **kw)
    module.configure_model()
    return module


def _datamodule(**kw) -> VisualInstructionDataModule:
    args = dict(data_path=str(ROOT / "data/datasets/llava/llava_train.json"), image_folder=str(ROOT / "data/datasets/llava"),
                tokenizer_path=str(ROOT / "data/checkpoints/tiny-llama"), image_size=64, max_length=256, val_set_size=8,
                batch_size=8, eval_batch_size=8, system_prompt="")
    args.update(kw)
    return VisualInstructionDataModule(**args)


def test_adapters_only_on_the_llm_tower_frozen_projector_trains():
    module = _module(LoRAConfig(rank=4, target_modules="all-linear"))
    wrapped = [n for n, m in module.model.named_modules() if isinstance(m, AdapterLinear)]
    assert wrapped and all(n.startswith("language_model.") for n in wrapped)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not is_adapter_param(n)} == {
        n for n, _ in module.model.named_parameters() if n.startswith("mm_projector.")}
    assert not any(p.requires_grad for p in module.model.vision_tower.parameters())


def test_image_features_replace_the_placeholder_and_labels_mask_them():
    module = _module(EffiLoRAConfig(rank=4))
    model = module.model
    P = model.vision_tower.num_patches
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 7, 8], [9, 10, 11, 0]])  # sample 1 is text-only and padded
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 10, 11, -100]])
    images = torch.randn(1, 3, 64, 64)
    embeds, new_mask, new_labels = model.embed(ids, mask, torch.tensor([1, 0]), images, labels)
    assert embeds.shape[:2] == (2, 3 + P) and new_mask.tolist()[1] == [1] * 3 + [0] * P
    table = model.language_model.get_input_embeddings()
    feats = model.image_features(images)[0]
    torch.testing.assert_close(embeds[0, 1:1 + P], feats)
    torch.testing.assert_close(embeds[0, 0], table.weight[5])
    torch.testing.assert_close(embeds[0, 1 + P], table.weight[7])
    assert new_labels[0].tolist() == [-100] + [IGNORE_INDEX] * P + [7, 8]
    assert new_labels[1, :3].tolist() == [-100, 10, 11]
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        model.embed(torch.tensor([[IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]]), torch.ones(1, 2, dtype=torch.long),
                    torch.tensor([1]), images)


def test_text_only_batch_still_runs_the_projector():
    module = _module(LoRAConfig(rank=4))
    ids = torch.tensor([[5, 6, 7]])
    out = module.model(ids, torch.ones_like(ids), torch.zeros(0, 3, 64, 64), torch.tensor([0]), labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in module.model.mm_projector.parameters())


def test_stage1_trains_the_projector_only_and_stage2_loads_it(tmp_path):
    stage1 = _module(None, lr_projector=1e-3, export_dir=str(tmp_path / "stage1"))
    before = {n: p.detach().clone() for n, p in stage1.model.named_parameters()}
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(stage1, datamodule=_datamodule())
    changed = {n for n, p in stage1.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if n.startswith("mm_projector.")}
    file = tmp_path / "stage1" / "mm_projector.safetensors"
    stage2 = _module(EffiLoRAConfig(rank=4), projector_path=str(file))
    for (n, a), b in zip(stage1.model.mm_projector.state_dict().items(), stage2.model.mm_projector.state_dict().values()):
        assert torch.equal(a, b), n
    groups = {g["name"]: g["lr"] for g in stage2.param_groups()}
    assert groups["projector"] == 2e-5 and "shared_a" in groups and "b" in groups


def test_missing_stage1_projector_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="No stage-1 projector at .*nope.safetensors"):
        _module(EffiLoRAConfig(rank=4), projector_path=str(tmp_path / "nope.safetensors"))


class _Record(pl.Callback):
    """Training loss and sample ids of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.sample_ids: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.sample_ids.append(list(batch["sample_id"]))


class _KillAfter(pl.Callback):
    """Stops the run after `step` optimizer steps, as a kill would (the schedule still plans for max_steps)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:  # the step-`step` checkpoint is written by now
            raise KeyboardInterrupt


def _fit_steps(root: Path, data_path: Path, steps: int, ckpt_path: str | None = None, every: int | None = None,
               kill_at: int | None = None) -> _Record:
    """Stage-2 run with epochs of 3 batches (`limit_train_batches`), so that 4 steps cross into epoch 1."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0, verbose=False)  # the projector's initialisation draws from the global generator
    module = _module(EffiLoRAConfig(rank=4), learning_rate=1e-3, lr_projector=1e-3, warmup_steps=2,
                     reducer={"warmup_steps": 0, "heatmap": False})
    record = _Record()
    callbacks: list[pl.Callback] = [record] + ([_KillAfter(kill_at)] if kill_at else [])
    if every:
        callbacks.append(ModelCheckpoint(dirpath=root / "ck", every_n_train_steps=every, save_top_k=-1))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_train_batches=3, limit_val_batches=0,
                         logger=False, enable_checkpointing=bool(every), callbacks=callbacks, default_root_dir=root,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    dm = _datamodule(data_path=str(data_path), val_set_size=0, batch_size=2, max_length=64)
    if kill_at:  # Lightning turns the interrupt into SystemExit after its graceful shutdown
        with pytest.raises(SystemExit):
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    else:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return record


def test_mid_epoch_resume_continues_the_same_data_order_and_losses(tmp_path):
    records = json.loads((ROOT / "data/datasets/llava/llava_train.json").read_text())
    data = tmp_path / "train.json"  # a slice of the bundled set (images stay under data/datasets/llava): faster setup
    data.write_text(json.dumps(records[:48]))
    full = _fit_steps(tmp_path / "full", data, 4)
    _fit_steps(tmp_path / "part", data, 4, every=2, kill_at=2)  # killed after step 2 of epoch 0 (3 batches)
    ckpt = next((tmp_path / "part" / "ck").glob("*step=2*"))
    resumed = _fit_steps(tmp_path / "resumed", data, 4, ckpt_path=str(ckpt))
    assert resumed.sample_ids == full.sample_ids[2:]  # the rest of epoch 0, then epoch 1's own order
    assert len(resumed.losses) == 2
    for a, b in zip(resumed.losses, full.losses[2:]):
        assert abs(a - b) <= 1e-6, (resumed.losses, full.losses)


def test_projector_init_is_seeded_by_init_seed_not_the_global_rng():
    torch.manual_seed(1)
    first = _module().model.mm_projector.state_dict()
    torch.manual_seed(2)  # another global state: the projector must not care
    second = _module().model.mm_projector.state_dict()
    other = _module(init_seed=5).model.mm_projector.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["0.weight"], other["0.weight"])


@pytest.fixture
def one_rank_mesh():
    """A one-process gloo group and its data-parallel mesh: what ModelParallelStrategy hands configure_model."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()


def test_fsdp2_groups_each_vision_block_and_decoder_layer_and_trains_in_bf16(one_rank_mesh):
    """Under FSDP2 the frozen tower is sharded block by block (each block its own group, like each decoder
    layer), the root keeps the rest; with bf16 all-gathers an image batch still runs forward and backward, the
    tower gets no gradient and every adapter B and the projector do."""
    from torch.distributed.fsdp import FSDPModule

    module = VisionLanguageModule(adapter=EffiLoRAConfig(rank=4), model_path=str(ROOT / "data/checkpoints/tiny-llama"), **TOWER,
                                  dtype="float32", fsdp_param_dtype="bfloat16")
    module._device_mesh = one_rank_mesh  # as ModelParallelStrategy sets it before configure_model
    module.configure_model()
    model = module.model
    groups = {n for n, m in model.named_modules() if isinstance(m, FSDPModule)}
    blocks = {n for n, m in model.named_modules() if m in model.vision_tower.blocks()}
    layers = {f"language_model.model.layers.{i}" for i in range(model.language_model.config.num_hidden_layers)}
    assert blocks and groups == {""} | blocks | layers

    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 7, 8]])
    out = model(ids, torch.ones_like(ids), torch.randn(1, 3, 64, 64), torch.tensor([1]), labels=ids.clamp(min=0))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = {n: p.grad is not None for n, p in model.named_parameters()}
    assert not any(g for n, g in grads.items() if n.startswith("vision_tower."))
    assert all(g for n, g in grads.items() if is_adapter_param(n) and ".effilora_B." in n)
    assert all(g for n, g in grads.items() if n.startswith("mm_projector."))

    # generation reaches into the model (embed, language_model.generate) without calling it: the root group
    # must be gathered around it, and sharded again after
    dm = _datamodule(val_set_size=4, eval_batch_size=4)
    dm.setup("validate")
    batch = next(b for b in dm.val_dataloader() if "prompt_input_ids" in b)
    module.tokenizer = dm.tokenizer
    module.hparams.max_new_tokens = 2
    assert len(module.generate_answers(batch)) == len(batch["answer"])
    assert type(model.language_model.get_input_embeddings().weight).__name__ == "DTensor"


def test_fsdp1_policy_makes_each_vision_block_a_unit_and_leaves_attention_projections_inside():
    """nn.MultiheadAttention reads its out_proj weight directly (never calls it), so only plain nn.Linear
    leaves become units of their own; the blocks and decoder layers are units too."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    module = VisionLanguageModule(adapter=EffiLoRAConfig(rank=4), model_path=str(ROOT / "data/checkpoints/tiny-llama"), **TOWER)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    module.configure_model()
    policy = module._trainer.strategy.kwargs["auto_wrap_policy"]
    wrapped = {n for n, m in module.model.named_modules() if policy(m, recurse=False, nonwrapped_numel=0)}
    blocks = {n for n, m in module.model.named_modules() if m in module.model.vision_tower.blocks()}
    assert blocks and blocks <= wrapped
    assert {f"{b}.mlp.c_fc" for b in blocks} <= wrapped
    assert not any(n.endswith("attn.out_proj") for n in wrapped)
    assert not any(n.startswith("mm_projector") for n in wrapped)  # trainable: stays with the root


def test_rank0_loading_other_ranks_build_the_same_model_on_meta_without_reading_weights(monkeypatch):
    """FSDP2 and FSDP1 read the checkpoints on rank 0 only (FineTuneModule): every other rank builds the LLaVA
    model on the meta device. It must be the same model (names, shapes, module classes: the tower's activation
    comes from its weight file's sidecar, read without the weights), and no weight file may be opened."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from effilora_lightning.distributed import fsdp1
    from effilora_lightning.models import vision_tower

    real = VisionLanguageModule(adapter=EffiLoRAConfig(rank=4), model_path=str(ROOT / "data/checkpoints/tiny-llama"),
                                **TOWER)._build_adapted(meta=False)

    def no_weights(*_, **__):
        raise AssertionError("a rank that receives rank 0's weights read a weight file")

    monkeypatch.setattr(vision_tower, "_load_visual_weights", no_weights)
    monkeypatch.setattr(fsdp1, "can_load_on_rank0", lambda strategy, path: True)  # as with 2+ ranks
    module = VisionLanguageModule(adapter=EffiLoRAConfig(rank=4), model_path=str(ROOT / "data/checkpoints/tiny-llama"),
                                  **TOWER)
    strategy = FSDPStrategy()
    strategy.parallel_devices = [torch.device("cpu")] * 2
    module._trainer = SimpleNamespace(strategy=strategy, is_global_zero=False)
    module.configure_model()
    meta = module.model
    assert all(t.is_meta for t in meta.state_dict().values())
    assert {n: type(m) for n, m in meta.named_modules()} == {n: type(m) for n, m in real.named_modules()}
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert {n for n, p in meta.named_parameters() if p.requires_grad} == {
        n for n, p in real.named_parameters() if p.requires_grad}
    assert strategy.kwargs["sync_module_states"] is True and strategy.kwargs["param_init_fn"] is not None


def test_the_callbacks_start_line_names_the_projector_that_trains_every_step():
    from effilora_lightning.selection import selectable_units, trained_beside_units

    module = _module(EffiLoRAConfig(rank=4))
    projector = sum(p.numel() for p in module.model.mm_projector.parameters())
    shared_a = sum(p.numel() for p in module.model.effilora_shared_a.parameters())
    beside = trained_beside_units(module, selectable_units(module))
    assert beside == {"the multimodal projector": projector, "shared A": shared_a}
