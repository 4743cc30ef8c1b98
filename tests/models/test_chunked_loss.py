"""The chunked loss in the modules: on by default, the same loss and adapter gradients as HF's ``labels=`` loss,
generation untouched, and the same under FSDP2 (one rank here; tests/distributed runs two ranks of every strategy).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from effilora_lightning import CausalLMModule, CommonsenseDataModule, EffiLoRAConfig, LoRAConfig, VisionLanguageModule
from effilora_lightning.adapters import is_adapter_param
from effilora_lightning.data.commonsense import is_generation_batch
from effilora_lightning.data.conversation import IMAGE_TOKEN_INDEX
from effilora_lightning.losses import ChunkedLossHead, find_loss_head

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "data" / "checkpoints" / "tiny-llama"
DATA = ROOT / "data" / "datasets" / "commonsense"
TOWER = dict(vision_tower="effilora-tiny-vit", vision_pretrained=str(ROOT / "data/checkpoints/tiny-clip/open_clip_model.safetensors"))
TIGHT = dict(rtol=1e-5, atol=1e-6)


def _assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same names; each within 1e-5 of its largest entry (fp32 sums in another order: cancellation makes an
    elementwise relative tolerance meaningless for entries near zero)."""
    assert set(got) == set(want) and got
    for name, g in got.items():
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        err, scale = float((g - want[name]).abs().max()), float(want[name].abs().max())
        assert err <= 1e-5 * scale + 1e-8, f"{name}: max error {err:.3g} against max |grad| {scale:.3g}"


def _causal(**kw) -> CausalLMModule:
    module = CausalLMModule(adapter=EffiLoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                            model_path=str(TINY), **kw)
    module.configure_model()
    return module


def _commonsense(**kw) -> CommonsenseDataModule:
    dm = CommonsenseDataModule(data_path=str(DATA / "commonsense_170k.json"), dataset_dir=str(DATA / "dataset"),
                               tokenizer_path=str(TINY), cutoff_len=96, batch_size=8, eval_batch_size=8,
                               val_set_size=16, val_generation_samples_per_task=1, max_test_samples_per_task=1, **kw)
    dm.setup("fit")
    return dm


def _train_batch() -> dict[str, torch.Tensor]:
    batch = next(iter(_commonsense().train_dataloader()))
    assert (batch["labels"] == -100).any()  # prompts are masked: the chunked path drops those rows
    return batch


def _nonzero_b(module: CausalLMModule) -> None:
    """B starts at zero; give it values so adapter gradients flow through every adapter weight."""
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if is_adapter_param(name):
                local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2 on one rank: the shard is whole
                local.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)


def _loss_and_grads(module: CausalLMModule, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = module.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    module.model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_training_step_gives_hf_loss_and_adapter_gradients_with_chunked_loss_on_and_off():
    on, off = _causal(loss_chunk_size=7), _causal(chunked_loss=False)
    assert on.hparams.chunked_loss and isinstance(find_loss_head(on.model), ChunkedLossHead)
    assert find_loss_head(off.model) is None and type(off.model.lm_head) is torch.nn.Linear
    assert list(on.model.state_dict()) == list(off.model.state_dict())  # same keys: checkpoints unchanged
    for m in (on, off):
        _nonzero_b(m)
    batch = _train_batch()
    hf = on.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss_on, grads_on = _loss_and_grads(on, batch)
    loss_off, grads_off = _loss_and_grads(off, batch)
    torch.testing.assert_close(loss_on, hf.detach(), **TIGHT)
    torch.testing.assert_close(loss_on, loss_off, **TIGHT)
    assert all(is_adapter_param(n) for n in grads_on)
    _assert_grads_close(grads_on, grads_off)
    with torch.no_grad():
        on.validation_step(batch, 0)  # the loss path of validation too (no generation batch)


def test_chunked_loss_is_on_by_default_and_its_chunk_size_is_range_checked():
    assert CausalLMModule(adapter=LoRAConfig(), model_path=str(TINY)).hparams.chunked_loss is True
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="loss_chunk_size must be an integer >= 1"):
            CausalLMModule(adapter=LoRAConfig(), model_path=str(TINY), loss_chunk_size=bad)


def test_generation_is_the_same_with_chunked_loss_on_and_off():
    dm = _commonsense()
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()[-1]))  # the generation loader
    assert is_generation_batch(batch)
    texts = []
    for module in (_causal(), _causal(chunked_loss=False)):
        _nonzero_b(module)
        module.tokenizer, module.hparams.max_new_tokens = dm.tokenizer, 6
        module.model.eval()
        texts.append(module.generate_answers(batch))
    assert texts[0] == texts[1] and len(texts[0]) == len(batch["answer"])


def _vlm(**kw) -> VisionLanguageModule:
    module = VisionLanguageModule(adapter=EffiLoRAConfig(rank=4), model_path=str(TINY), **TOWER, **kw)
    module.configure_model()
    return module


def test_llava_loss_and_gradients_are_the_same_with_chunked_loss_on_and_off():
    on, off = _vlm(loss_chunk_size=3), _vlm(chunked_loss=False)
    assert isinstance(find_loss_head(on.model.language_model), ChunkedLossHead)
    assert find_loss_head(off.model) is None
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 7, 8, 9], [9, 10, 11, 12, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, -100, 11, 12, -100]])
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    results = []
    for m in (on, off):
        _nonzero_b(m)
        loss = m.model(ids, mask, images, torch.tensor([1, 0]), labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.model.named_parameters() if p.grad is not None}))
    (loss_on, grads_on), (loss_off, grads_off) = results
    torch.testing.assert_close(loss_on, loss_off, **TIGHT)
    assert any(n.startswith("mm_projector.") for n in grads_on)
    _assert_grads_close(grads_on, grads_off)


@pytest.fixture
def one_rank_mesh():
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


def test_fsdp2_root_forward_computes_the_chunked_loss_with_the_gathered_head(one_rank_mesh):
    """Under FSDP2 the head lives in the root group: the chunked loss runs inside the root's forward, where the
    head is gathered, and gives the plain module's loss and adapter gradients."""
    from torch.distributed.fsdp import FSDPModule

    config = dict(model_type="llama", vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)  # the tiny tokenizer's vocabulary
    adapter = EffiLoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"])
    plain = CausalLMModule(adapter=adapter, model_config=config, chunked_loss=False)
    sharded = CausalLMModule(adapter=adapter, model_config=config, loss_chunk_size=64)
    plain.configure_model()
    sharded._device_mesh = one_rank_mesh  # as ModelParallelStrategy sets it before configure_model
    sharded.configure_model()
    assert isinstance(sharded.model, FSDPModule) and isinstance(find_loss_head(sharded.model), ChunkedLossHead)
    for m in (plain, sharded):
        _nonzero_b(m)
    batch = _train_batch()
    loss_plain, grads_plain = _loss_and_grads(plain, batch)
    loss_sharded, grads_sharded = _loss_and_grads(sharded, batch)
    torch.testing.assert_close(loss_sharded, loss_plain, **TIGHT)
    _assert_grads_close(grads_sharded, grads_plain)
    assert type(sharded.model.lm_head.weight).__name__ == "DTensor"  # sharded again after the step
