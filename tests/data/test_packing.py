"""Packed loss batches (``batch.pack``, ``CommonsenseDataModule(pack_sequences=True)``): the padded batch's samples,
loss and gradients, several samples to a row, and next to no padding."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from effilora_lightning import CausalLMModule, CommonsenseDataModule, EffiLoRAConfig, adapter_parameters
from effilora_lightning.callbacks.monitor import _Meter
from effilora_lightning.data.batch import (
    IGNORE_INDEX,
    model_inputs,
    num_samples,
    pack,
    pack_rows,
    packed_rows,
    pad,
    pad_mask,
)
from effilora_lightning.losses import install_chunked_loss_head

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "data" / "checkpoints" / "tiny-llama"
DATA = ROOT / "data" / "datasets" / "commonsense"


def test_rows_are_balanced_longest_first_to_the_least_filled_row():
    assert pack_rows([5, 3, 3, 2, 1], 2) == [[0, 3], [1, 2, 4]]  # 7 and 7
    assert pack_rows([5, 3, 3, 2, 1], 5) == [[0], [1], [2], [3], [4]]
    assert pack_rows([2, 2, 2, 2], 1) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="1 <= num_rows <= 2 samples, got 3"):
        pack_rows([1, 1], 3)


def test_the_row_count_is_the_one_with_fewest_positions():
    lengths = [60, 70, 55, 65]  # just over half of 128: one per row at width 70 (4 x 70 = 280 positions)
    assert packed_rows(lengths) == [[0], [1], [2], [3]]
    assert packed_rows(lengths, width=128) == [[1, 2], [3, 0]]  # 2 rows of 125 = 250 positions
    assert packed_rows([9, 3, 14, 5, 5, 2, 11, 7], width=20) == [[2], [6, 1], [0, 4], [7, 3, 5]]  # 4 x 14, full
    assert packed_rows([3, 3, 2], width=100) == [[0, 1, 2]]  # 1 x 8 beats 3 x 3
    assert packed_rows([3, 3, 3], width=100) == [[0], [1], [2]]  # 3 x 3 ties 1 x 9: the narrower
    assert packed_rows([], width=8) == []
    with pytest.raises(ValueError, match="a 9-token sample does not fit a packed row of 8 tokens"):
        packed_rows([9, 1], width=8)


def test_pack_lays_out_ids_labels_positions_and_mask_exactly():
    ids = [[10, 11, 12], [20, 21, 22, 23, 24], [30]]
    labels = [[-100, 11, 12], [20, 21, 22, 23, 24], [30]]  # sample 1 trains on its first token (train_on_inputs)
    out = pack(ids, labels, pad_id=0)
    # rows: [1] (5 wide), [0, 2] (3 + 1 of 5)
    assert out["input_ids"].tolist() == [[20, 21, 22, 23, 24], [10, 11, 12, 30, 0]]
    assert out["labels"].tolist() == [[-100, 21, 22, 23, 24], [-100, 11, 12, -100, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]  # the tail continues sample 2
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert out["num_samples"] == 3 and num_samples(out) == 3
    assert int((out["position_ids"] == 0).sum()) == 3  # every 0 is a sample start
    assert pack(ids, labels, pad_id=0, width=8)["input_ids"].shape == (2, 5)  # 2 x 5 beats 2 x 8
    wide = pack(ids, labels, pad_id=0, width=9)  # one row of 9 beats 2 x 5
    assert wide["input_ids"].tolist() == [[20, 21, 22, 23, 24, 10, 11, 12, 30]]
    assert wide["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0]]
    inputs = model_inputs(out)
    assert set(inputs) == {"input_ids", "position_ids", "use_cache"} and inputs["use_cache"] is False


def test_pack_refuses_nothing_and_mismatched_samples():
    with pytest.raises(ValueError, match="at least one sample"):
        pack([], [], pad_id=0)
    with pytest.raises(ValueError, match="sample 1 of the batch: 2 ids but 3 labels"):
        pack([[1], [1, 2]], [[1], [1, 2, 3]], pad_id=0)


def _samples(seed: int, train_on_inputs: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    g = np.random.default_rng(seed)
    ids, labels = [], []
    for n in (9, 3, 14, 5, 5, 2, 11, 7):
        x = g.integers(3, 128, n)
        y = x.copy()
        if not train_on_inputs:
            y[: n // 2] = IGNORE_INDEX
        ids.append(x)
        labels.append(y)
    return ids, labels


def _padded(ids, labels) -> dict[str, torch.Tensor]:
    return {"input_ids": pad(ids, 0, "right"), "attention_mask": pad_mask(ids, "right"),
            "labels": pad(labels, IGNORE_INDEX, "right")}


@pytest.mark.parametrize("attn", ["sdpa", "eager", "sdpa_packed", "sdpa_packed_from_positions"])
@pytest.mark.parametrize("chunked", [False, True], ids=["hf_loss", "chunked_loss"])
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_packed_loss_and_gradients_equal_the_padded_batch(tiny_llama, attn, chunked, train_on_inputs):
    """sdpa_packed: the batch's ``packed_segments`` passed (the module's path), or read from position_ids."""
    segments = attn == "sdpa_packed"
    model = tiny_llama(layers=2, attn_implementation=attn.removesuffix("_from_positions")).train()
    head = install_chunked_loss_head(model, chunk_size=16) if chunked else None
    ids, labels = _samples(0, train_on_inputs)
    padded, packed = _padded(ids, labels), pack(ids, labels, pad_id=0, width=20)
    assert packed["input_ids"].shape == (4, 14) and bool(packed["attention_mask"].all())  # 56 tokens, no padding
    assert padded["input_ids"].shape == (8, 14)  # 112 positions for the same 56 tokens

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        if head is None:
            loss = model(**model_inputs(batch, segments), labels=batch["labels"]).loss
        else:
            with head.computing_loss(batch["labels"]):
                loss = model(**model_inputs(batch, segments)).logits
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    want_loss, want = loss_and_grads(padded)
    got_loss, got = loss_and_grads(packed)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_with_a_cache_the_samples_of_a_row_would_see_each_other(tiny_llama):
    """Why ``model_inputs`` passes use_cache=False: HF looks for packed boundaries only without a cache."""
    model = tiny_llama(layers=2).train()
    ids, labels = _samples(1, train_on_inputs=True)
    padded, packed = _padded(ids, labels), pack(ids, labels, pad_id=0, width=20)
    want = model(**model_inputs(padded), labels=padded["labels"]).loss
    leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=True,
                  labels=packed["labels"]).loss
    assert not torch.allclose(leaky, want, rtol=1e-4)
    torch.testing.assert_close(model(**model_inputs(packed), labels=packed["labels"]).loss, want, rtol=1e-5,
                               atol=1e-6)


def _datamodule(**kw) -> CommonsenseDataModule:
    dm = CommonsenseDataModule(data_path=str(DATA / "commonsense_170k.json"), dataset_dir=str(DATA / "dataset"),
                               tokenizer_path=str(TINY), cutoff_len=128, batch_size=16, val_set_size=32,
                               max_test_samples_per_task=2, train_on_inputs=False, **kw)
    dm.setup("fit")
    return dm


def _unpack(batch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(ids, labels after the first) of every sample of a packed or padded batch, sorted."""
    out = []
    if "position_ids" not in batch:
        for x, y, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            n = int(m.sum())
            out.append((tuple(x[:n].tolist()), tuple(y[1:n].tolist())))
        return sorted(out)
    for x, y, p, m in zip(batch["input_ids"], batch["labels"], batch["position_ids"], batch["attention_mask"],
                          strict=True):
        starts = [int(i) for i in torch.nonzero(p == 0).flatten()] + [int(m.sum())]
        for a, b in zip(starts, starts[1:]):
            assert int(y[a]) == IGNORE_INDEX
            out.append((tuple(x[a:b].tolist()), tuple(y[a + 1:b].tolist())))
    return sorted(out)


def test_datamodule_packs_the_same_samples_per_step_with_far_less_padding():
    padded_dm, packed_dm = _datamodule(), _datamodule(pack_sequences=True)  # pack_width None: 2 x cutoff_len
    loaders = {"train": (padded_dm.train_dataloader(), packed_dm.train_dataloader()),
               "val_loss": (padded_dm.val_dataloader()[0], packed_dm.val_dataloader()[0])}
    for name, (plain, packed) in loaders.items():
        pads = {"plain": [], "packed": []}
        for step, (a, b) in enumerate(zip(plain, packed, strict=True)):
            assert _unpack(b) == _unpack(a), (name, step)
            assert num_samples(b) == num_samples(a)
            pads["plain"].append(1 - a["attention_mask"].float().mean().item())
            pads["packed"].append(1 - b["attention_mask"].float().mean().item())
            if step == 20:
                break
        plain_pad, packed_pad = np.mean(pads["plain"]), np.mean(pads["packed"])
        assert packed_pad < 0.08 and packed_pad < plain_pad / 3, (name, plain_pad, packed_pad)  # ~20 % -> ~5 %


def test_rows_as_narrow_as_the_cutoff_pack_what_fits_and_never_pad_more():
    """At cutoff 128 the bundled samples (55-108 tokens) mostly fill a row alone: packing cannot help much,
    and never pads more than the right-padded batch (the longest sample's width is always tried)."""
    padded, packed = _datamodule(), _datamodule(pack_sequences=True, pack_width=128)
    for step, (a, b) in enumerate(zip(padded.train_dataloader(), packed.train_dataloader(), strict=True)):
        assert b["attention_mask"].numel() <= a["attention_mask"].numel()
        assert b["input_ids"].shape[1] <= 128
        if step == 10:
            break


def test_pack_width_shorter_than_the_cutoff_is_refused_up_front():
    with pytest.raises(ValueError, match="pack_width=64 is shorter than cutoff_len=128"):
        CommonsenseDataModule(data_path="x.json", dataset_dir="d", tokenizer_path=str(TINY), cutoff_len=128,
                              pack_sequences=True, pack_width=64)


def test_monitor_counts_the_samples_of_a_packed_batch_not_its_rows():
    ids, labels = _samples(0, train_on_inputs=False)
    meter = _Meter()
    meter.count_batch(pack(ids, labels, pad_id=0))
    meter.count_batch(_padded(ids, labels))
    assert meter.samples == 16 and int(meter.tokens) == 2 * sum(len(x) for x in ids)


def _fit(tmp_path: Path, packed: bool, pack_width: int = 256,
         attn_implementation: str | None = None) -> tuple[list[float], list[torch.Tensor], list[list[bool]]]:
    pl.seed_everything(0)
    module = CausalLMModule(model_path=str(TINY), learning_rate=1e-2, warmup_steps=1,
                            attn_implementation=attn_implementation,
                            adapter=EffiLoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                            reducer={"keep_ratio": 0.5, "warmup_steps": 1, "heatmap": False})
    losses: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Losses()], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_datamodule(pack_sequences=packed, pack_width=pack_width))
    return losses, [p.detach().clone() for p in adapter_parameters(module)], \
        [h.tolist() for h in module.reducer.history]


@pytest.mark.parametrize("attn, width", [(None, 256), ("sdpa_packed", 16 * 128)], ids=["sdpa", "sdpa_packed_one_row"])
def test_training_on_packed_batches_is_training_on_padded_ones(tmp_path, monkeypatch, attn, width):
    """Four EffiLoRA keep-0.5 steps through the product's path: same losses, selections and adapter weights;
    sdpa_packed with a pack_width of the whole batch (one row, no padding), the module passing the batch's
    segments (only the packing check's two 5- and 2-token forwards read position_ids back)."""
    import effilora_lightning.models.packed_attention as packed_attention

    want_losses, want_params, want_history = _fit(tmp_path / "padded", packed=False)
    reads = []
    real = packed_attention.segments_from_positions
    monkeypatch.setattr(packed_attention, "segments_from_positions", lambda p: reads.append(p.shape[1]) or real(p))
    got_losses, got_params, got_history = _fit(tmp_path / "packed", packed=True, pack_width=width,
                                               attn_implementation=attn)
    assert set(reads) == ({5, 2} if attn else set())
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    assert got_history == want_history
    for g, w in zip(got_params, want_params, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "sdpa_packed"])
def test_the_packing_check_passes_a_model_that_keeps_samples_apart(tiny_llama, attn):
    from effilora_lightning.models.causal_lm import check_keeps_packed_samples_apart

    check_keeps_packed_samples_apart(tiny_llama(layers=2, attn_implementation=attn), torch.arange(3, 20).view(1, -1))


def test_the_packing_check_refuses_a_model_that_lets_them_mix(tiny_llama, monkeypatch):
    """As a transformers without packed-sequence masks would (every sample seeing the ones before it)."""
    import transformers.masking_utils as masking

    from effilora_lightning.models.causal_lm import check_keeps_packed_samples_apart

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match=r"pack_sequences: this model \(attn_implementation='sdpa'\) does not keep "
                                         r"packed samples apart.*data.pack_sequences: false"):
        check_keeps_packed_samples_apart(tiny_llama(layers=2), torch.arange(3, 20).view(1, -1))


def test_the_first_packed_training_step_runs_the_check_once(tmp_path, monkeypatch):
    import effilora_lightning.models.causal_lm as causal_lm

    calls = []
    real = causal_lm.check_keeps_packed_samples_apart
    monkeypatch.setattr(causal_lm, "check_keeps_packed_samples_apart", lambda *a: calls.append(1) or real(*a))
    _fit(tmp_path, packed=True)
    assert calls == [1]
    _fit(tmp_path / "padded", packed=False)
    assert calls == [1]


def test_packing_a_large_batch_stays_cheap():
    """Row counts stop once no more rows can beat the best: 256 samples pack in well under a second."""
    import time

    lengths = np.random.default_rng(0).integers(30, 250, 256).tolist()
    start = time.perf_counter()
    rows = packed_rows(lengths, width=512)
    assert time.perf_counter() - start < 0.5
    assert sorted(i for row in rows for i in row) == list(range(256))
    fullest = max(sum(lengths[i] for i in row) for row in rows)
    assert fullest <= 512 and sum(lengths) / (len(rows) * fullest) > 0.95
