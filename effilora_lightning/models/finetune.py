"""FineTuneModule: adapter fine-tuning of any model, task-agnostic. The task modules (CausalLMModule for
commonsense reasoning, VisionLanguageModule for visual instruction tuning) add their batches and evaluation.

    configure_model      build_base_model (the task's) -> apply_adapter (BEFORE any sharding) -> chunked loss
                         head -> saved adapter weights -> activation checkpointing -> sharding, where FSDP2
                         and FSDP1 load the checkpoint on rank 0 only (every other rank builds on meta)
    configure_callbacks  EfficiencyMonitor (perf/*) for every method; EffiLoRACallback for EffiLoRA
    configure_optimizers AdamW over EVERY adapter parameter (by name) in named groups (shared_a, a, b, router,
                         + the task's, e.g. projector), each with its own learning rate; warm-up then decay
    checkpoints          adapter weights (+ ``keep_in_checkpoint``) only, checked on load (checkpoints.py)
    on_train_end         export_dir/adapter and, where the method is a LoRA, export_dir/peft

Strategy facts live in ``effilora_lightning.distributed``; this module only calls them from its hooks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ..adapters import AdapterConfig, apply_adapter, load_adapter, method_of
from ..adapters.export import export_peft_lora, save_adapter
from ..checkpoint_io import check_checkpoint_file, install_checkpoint_io, remove_orphaned_checkpoints
from ..distributed import fsdp1
from ..distributed.checks import check_strategy
from ..distributed.fsdp2 import materialize_from_rank0, shard_model
from ..distributed.private import attached_trainer, device_mesh_of
from ..losses import find_loss_head, install_chunked_loss_head
from ..selection.config import SelectionConfig
from . import checkpoints, optim
from .selection_setup import build_selection_callbacks, resolve_selection
from .settings import check_settings, check_token_ids

__all__ = ["FineTuneModule"]


class FineTuneModule(pl.LightningModule):
    """Adapter fine-tuning, whatever the task. Subclasses implement ``build_base_model`` and their steps.

    Args:
        adapter: LoRAConfig, EffiLoRAConfig, HydraLoRAConfig, LilyConfig or any registered method's config.
        model_path: local Hugging Face checkpoint directory (config.json, tokenizer, safetensors).
        model_config: instead of model_path, a config dict to build a randomly initialised model.
        dtype: dtype of the frozen base weights (adapters stay fp32 unless the adapter says otherwise).
        learning_rate: default learning rate of every adapter group.
        lr_shared_a / lr_b / lr_router: per-group overrides (None = learning_rate).
        weight_decay: AdamW decoupled weight decay on adapter weights.
        adamw_implementation: torch's AdamW ``fused`` (default, as Hugging Face Trainer's: one kernel for all
            parameters), ``foreach`` or ``for_loop`` (torch's default on CPU, a Python loop over the parameters;
            it reproduces runs from before 2026-12-05 bit for bit; ``foreach`` gives the same bits). ``models.optim``.
            A resume keeps the implementation its checkpoint was written with (exact continuation) and warns
            when that is not this one.
        scheduler: ``cosine`` or ``linear`` decay after warm-up, or ``constant``.
        warmup_steps: linear warm-up, in optimizer steps (int) or as a share of all steps (float < 1).
        min_lr_ratio: the decay ends at learning_rate * min_lr_ratio.
        gradient_checkpointing: non-reentrant activation checkpointing (reentrant would starve adapters).
        max_new_tokens / num_beams: generation for accuracy (reference: 32 tokens, 4 beams).
        selection: the selection settings EffiLoRACallback gets when the adapter is EffiLoRA (``SelectionConfig``,
            typed and validated; None = its defaults). The module adds the callback itself.
        reducer: the older spelling of the same, one untyped block of EffiLoRACallback's arguments (the paper
            calls the selection part the "Reducer"): the selection settings plus ``log_every_n_steps``,
            ``heatmap`` and ``peak_flops``. Give ``selection`` or ``reducer``, not both.
        log_every_n_steps: period of the selection and perf/* logs, in optimizer steps (None: the Trainer's).
        heatmap: write ``effilora_selection.png`` (units x steps) into the log directory after fit (EffiLoRA).
        peak_flops: peak FLOP/s of one device for ``perf/mfu`` (None: Lightning's table for CUDA devices).
        load_adapter_from: initialise the adapter from a directory written by ``save_adapter``.
        export_dir: at the end of fit, write ``<export_dir>/adapter`` and, where possible, ``<export_dir>/peft``.
        fsdp_param_dtype: under ModelParallelStrategy (FSDP2), the all-gather/compute dtype (``bfloat16`` on
            GPUs); gradients are always reduced in fp32.
        init_seed: seeds model_config initialisation (adapter init is seeded by the adapter config).
        chunked_loss: compute the training/validation loss with the LM head and cross-entropy fused per chunk
            of ``loss_chunk_size`` tokens (``effilora_lightning.losses``): never the (tokens x vocab) logits, same
            loss and gradients as HF's. False: HF's own ``labels=`` loss. Generation is the same either way.
        loss_chunk_size: tokens per chunk of the chunked loss (chunk x vocab fp32 logits exist at once).
        attn_implementation: the LM's attention (transformers' ``attn_implementation``): None = transformers'
            default (``sdpa``), ``eager``, ``flash_attention_2`` (needs flash-attn), or ``sdpa_packed``: each sample
            of a packed batch attended on its own, without the block mask of the row: one SDPA call per sample,
            or on CUDA in bf16 / fp16 one ``torch.nn.attention.varlen`` flash call per layer
            (``models.packed_attention``; with ``data.pack_width`` = batch size x cutoff a batch is one row with
            no padding); under it, padded batches and generation are ``sdpa``'s.
    """

    requires_adapter = True  # VisionLanguageModule's stage 1 trains the projector alone

    def __init__(
        self,
        adapter: AdapterConfig | None = None,
        model_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        learning_rate: float = 3e-4,
        lr_shared_a: float | None = None,
        lr_b: float | None = None,
        lr_router: float | None = None,
        weight_decay: float = 0.0,
        adamw_implementation: Literal["fused", "foreach", "for_loop"] = "fused",
        scheduler: Literal["cosine", "linear", "constant"] = "cosine",
        warmup_steps: int | float = 0,
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        selection: SelectionConfig | None = None,
        reducer: dict[str, Any] | None = None,
        log_every_n_steps: int | None = None,
        heatmap: bool = True,
        peak_flops: float | None = None,
        load_adapter_from: str | None = None,
        export_dir: str | None = None,
        fsdp_param_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        init_seed: int = 0,
        chunked_loss: bool = True,
        loss_chunk_size: int = 1024,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        _check_model_args(type(self), adapter, model_path, model_config, loss_chunk_size)
        self.save_hyperparameters(ignore=["adapter", "selection"])
        check_settings(type(self).__name__, self.hparams)
        self.adapter = adapter
        settings = resolve_selection(selection, reducer, {"log_every_n_steps": log_every_n_steps,
                                                          "heatmap": heatmap, "peak_flops": peak_flops})
        self.selection = settings.config
        self.hparams["selection"] = dataclasses.asdict(settings.config) if selection is not None else None
        self.selection_callbacks = build_selection_callbacks(settings, adapter)
        self.strict_loading = False  # checkpoints hold adapter weights only
        self.model: nn.Module | None = None
        self.tokenizer: Any = None

    # ------------------------------------------------------------------ what a task provides
    def build_base_model(self, meta: bool = False) -> nn.Module:  # pragma: no cover - abstract
        """The frozen base model (on the meta device if asked: architecture only, no weights read)."""
        raise NotImplementedError

    def language_model(self, model: nn.Module) -> nn.Module:
        """The Hugging Face LM inside ``model`` (loss head, activation checkpointing, token-id checks)."""
        return model

    def after_adapter(self, model: nn.Module) -> None:
        """Called once the adapter is in (e.g. VisionLanguageModule unfreezes its projector)."""

    def extra_fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """Blocks of ``model`` besides the decoder layers that get their own FSDP group or unit (a vision
        tower's)."""
        return []

    def keep_in_checkpoint(self, key: str) -> bool:
        """Non-adapter weights that still train (VisionLanguageModule keeps its projector)."""
        return False

    def export(self, out: Path) -> None:
        """Write the trained weights into ``out`` (every rank calls it: gathering is a collective)."""
        save_adapter(self.model, out / "adapter")
        if method_of(self.adapter).exports_peft_lora(self.adapter):
            export_peft_lora(self.model, out / "peft", base_model_name_or_path=self.hparams.model_path)

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        if self.model is not None:
            return  # Lightning may call this more than once
        self._check_strategy()
        trainer = attached_trainer(self)
        mesh = device_mesh_of(self)  # set by ModelParallelStrategy (FSDP2)
        fsdp1_strategy = fsdp1.fsdp1_strategy(trainer)
        if mesh is not None and self.hparams.model_path is not None:
            self.model = self._build_sharded(mesh["data_parallel"], trainer)
        else:
            rank0_load = fsdp1_strategy is not None and fsdp1.can_load_on_rank0(fsdp1_strategy, self.hparams.model_path)
            self.model = self._build_adapted(meta=rank0_load and not trainer.is_global_zero)
            if mesh is not None:
                shard_model(self.model, mesh["data_parallel"], self.hparams.fsdp_param_dtype,
                            extra_units=self.extra_fsdp_units(self.model))
            if fsdp1_strategy is not None:
                fsdp1.configure_fsdp1(fsdp1_strategy, self.model, self.extra_fsdp_units(self.model), rank0_load,
                                      info=rank_zero_info)
        self.check_inputs_fit_model()

    def _build_adapted(self, meta: bool = False) -> nn.Module:
        """Base model (train mode, frozen) + adapter (+ saved adapter weights) + activation checkpointing."""
        hp = self.hparams
        model = self.build_base_model(meta)
        model.train()  # from_pretrained returns eval mode; adapter dropout must be live
        model.requires_grad_(False)
        if self.adapter is not None:
            self.adapter_report = apply_adapter(model, self.adapter)
            rank_zero_info(str(self.adapter_report))
        self.after_adapter(model)
        lm = self.language_model(model)
        if hp.chunked_loss:  # swap the LM head for a ChunkedLossHead holding the same parameters, before sharding
            install_chunked_loss_head(lm, hp.loss_chunk_size, on_skip=rank_zero_info)
        if hp.load_adapter_from and not meta:
            load_adapter(model, hp.load_adapter_from)
        if hp.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def _build_sharded(self, mesh: Any, trainer: Any) -> nn.Module:
        """FSDP2 without N copies in RAM: every rank builds the adapted model on the meta device and shards
        it; rank 0 alone loads the checkpoint (and initialises the adapter, seeded) and broadcasts it."""
        model = self._build_adapted(meta=True)
        shard_model(model, mesh, self.hparams.fsdp_param_dtype, extra_units=self.extra_fsdp_units(model))
        if trainer is not None:
            rank0, device = trainer.is_global_zero, trainer.strategy.root_device
        else:  # configured by hand, outside a Trainer (a user's loop, a test): the mesh says where
            rank0, device = mesh.get_rank() == 0, torch.device(mesh.device_type)
        full = self._build_adapted().state_dict() if rank0 else {}
        materialize_from_rank0(model, full, device)
        return model

    def _check_strategy(self) -> None:
        """Refuse, at start, what the trainer's strategy cannot do (``distributed.checks``)."""
        trainer = attached_trainer(self)
        check_strategy(trainer.strategy if trainer is not None else None, rank_zero_warn)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The matmul dtype when FSDP2 all-gathers in ``fsdp_param_dtype`` (the monitor's MFU reads it);
        None: the precision plugin's dtype applies."""
        sharded = device_mesh_of(self) is not None and self.hparams.fsdp_param_dtype is not None
        return getattr(torch, self.hparams.fsdp_param_dtype) if sharded else None

    def configure_callbacks(self) -> list[pl.Callback]:
        return list(self.selection_callbacks)

    @property
    def reducer(self) -> pl.Callback | None:
        """The EffiLoRACallback this module adds (the paper's "Reducer": the selection), or None for other methods."""
        from ..callbacks import EffiLoRACallback

        return next((c for c in self.selection_callbacks if isinstance(c, EffiLoRACallback)), None)

    @property
    def monitor(self) -> pl.Callback:
        """The EfficiencyMonitor this module adds (perf/* for every method)."""
        from ..callbacks import EfficiencyMonitor

        return next(c for c in self.selection_callbacks if isinstance(c, EfficiencyMonitor))

    def setup(self, stage: str) -> None:
        trainer = attached_trainer(self)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        self.tokenizer = getattr(dm, "tokenizer", None)  # else loaded from model_path when generation needs it
        if trainer is not None:
            install_checkpoint_io(trainer.strategy)  # temp files beside the target, broken files named
            ckpt_path = getattr(trainer, "ckpt_path", None)
            if ckpt_path is not None and "://" not in str(ckpt_path):  # every strategy, also those (FSDP1,
                check_checkpoint_file(ckpt_path)  # ModelParallelStrategy) that read the file without our IO
        if self.model is not None:  # configured before the Trainer got it; else configure_model checks
            self.check_inputs_fit_model()

    def check_inputs_fit_model(self) -> None:
        """Before any step, once the model exists: every special token id the data uses has an input embedding
        (VisionLanguageModule adds the image size). Without a tokenizer (no datamodule), nothing to check."""
        if self.tokenizer is None or self.model is None:
            return
        trainer = attached_trainer(self)
        template = getattr(getattr(trainer, "datamodule", None), "template", None)
        extra = (*getattr(template, "special_tokens", ()), getattr(template, "end_of_turn", None))
        embeddings = self.language_model(self.model).get_input_embeddings()
        check_token_ids(self.tokenizer, embeddings.num_embeddings, extra,
                        where=f"the model ({self.hparams.model_path or 'model_config'})")

    # ------------------------------------------------------------------ loss helpers the tasks share
    def lm_loss(self, labels: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """Mean next-token loss of ``self.language_model(...)`` called with ``inputs``: chunked (no full logits)
        when the head was swapped, else HF's ``labels=`` loss. Goes through the model's own forward (FSDP hooks)."""
        lm = self.language_model(self.model)
        head = find_loss_head(lm)
        if head is None:
            return lm(**inputs, labels=labels).loss
        with head.computing_loss(labels):  # the head returns the loss as HF's `logits`
            return lm(**inputs).logits

    def log_padding_fraction(self, batch: dict[str, Any]) -> None:
        """``perf/padding_fraction``: padding / all positions of this rank's (B, T) token batch, each image one
        position (a device tensor: no host sync here; the logger reads it every log_every_n_steps)."""
        mask = batch["attention_mask"]
        self.log("perf/padding_fraction", 1.0 - mask.float().mean(), on_step=True, on_epoch=False,
                 batch_size=mask.shape[0])

    # ------------------------------------------------------------------ FSDP1 root, export
    def on_fit_start(self) -> None:
        # in __dict__, not as an attribute: nn.Module would register the wrapper (which wraps self) as a child
        self.__dict__["_fsdp1_root"] = fsdp1.fsdp1_root(self.trainer)

    def on_validation_start(self) -> None:
        fsdp1.reuse_fsdp1_root(self.trainer, self, self.__dict__.get("_fsdp1_root"))

    def on_test_start(self) -> None:
        fsdp1.reuse_fsdp1_root(self.trainer, self, self.__dict__.get("_fsdp1_root"))

    def on_predict_start(self) -> None:
        fsdp1.reuse_fsdp1_root(self.trainer, self, self.__dict__.get("_fsdp1_root"))

    def on_train_start(self) -> None:
        remove_orphaned_checkpoints(self.trainer)  # resumed from last.ckpt: files the killed run wrote after it

    def on_train_end(self) -> None:
        if self.hparams.export_dir is None:
            return
        out = Path(self.hparams.export_dir)
        with fsdp1.gathered_for_export(self.trainer.strategy.model):
            self.export(out)
        rank_zero_info(f"Trained weights written to {out}")

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """Every adapter parameter (by name, frozen ones too) in named groups with their own learning rate."""
        hp = self.hparams
        return optim.adapter_param_groups(self.named_parameters(), hp.learning_rate,
                                          {"shared_a": hp.lr_shared_a, "b": hp.lr_b, "router": hp.lr_router})

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return optim.adamw_with_schedule(self.param_groups(), hp.learning_rate, hp.weight_decay, hp.scheduler,
                                         hp.warmup_steps, hp.min_lr_ratio, self.trainer.estimated_stepping_batches,
                                         hp.adamw_implementation)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """By the GLOBAL norm under FSDP1 too (``distributed.fsdp1.clip_fsdp1_grad_norm``); else Lightning's path."""
        if not fsdp1.clip_fsdp1_grad_norm(self.trainer.strategy.model, gradient_clip_val, gradient_clip_algorithm):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoints.keep_adapter_only(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoints.check_loaded_keys(self, checkpoint)
        saved = optim.resumed_implementation(checkpoint, self.hparams.adamw_implementation)
        if saved is not None:
            rank_zero_warn(f"Resuming with the checkpoint's AdamW implementation, {saved}, so that the run goes on "
                           f"exactly as it would have; adamw_implementation={self.hparams.adamw_implementation!r} "
                           "applies to runs that start without a checkpoint.")

    def in_checkpoint(self, key: str) -> bool:
        """Whether a state-dict key is saved in checkpoints (and so required when resuming from one)."""
        return checkpoints.is_saved(self, key)


def _check_model_args(cls: type, adapter: Any, model_path: str | None, model_config: Any, chunk: Any) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"loss_chunk_size must be an integer >= 1 (tokens per chunk of the chunked loss), got {chunk!r}")
    if adapter is None and cls.requires_adapter:
        raise ValueError(f"{cls.__name__} needs an adapter config (LoRAConfig, EffiLoRAConfig, ...).")
    if adapter is not None and not isinstance(adapter, AdapterConfig):
        raise TypeError(f"adapter must be an adapter config (LoRAConfig, EffiLoRAConfig, ...), got {type(adapter).__name__}.")
    if model_path is None and model_config is None:
        raise ValueError(f"{cls.__name__} needs model_path (a local checkpoint directory) or model_config.")
