"""CausalLMModule: a Hugging Face causal LM (LLaMA-3 first) fine-tuned with any of the four adapters.

    configure_model      load from a local directory (never a download) or build from a config; inject the
                         adapter BEFORE any sharding; optional non-reentrant activation checkpointing
    training_step        teacher-forced loss (labels already -100 where they must not count)
    validation_step      loss batches -> val_loss; generation batches -> per-task accuracy
    test_step            generation on every eval task -> per-task table and average
    configure_optimizers AdamW over EVERY adapter parameter (by name) in fixed groups shared_a/a/b/router,
                         each with its own learning rate; warm-up then cosine/linear/constant
    checkpoints          adapter weights only (base weights reload from model_path); sharded FSDP2 ones
                         too under effilora_lightning.strategies.AdapterModelParallelStrategy

With an EffiLoRA adapter the module adds ``EffiLoRACallback(**reducer)`` itself (``configure_callbacks``),
so switching methods in YAML is one line: the adapter's ``class_path``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors import SafetensorError
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import AdapterConfig, EffiLoRAConfig, apply_adapter, is_adapter_param, param_group
from ..adapters.base import unwrapped_name
from ..adapters.export import check_safetensors_file, export_peft_lora, save_adapter
from ..callbacks import EffiLoRACallback
from ..checkpoint_io import check_checkpoint_file, install_checkpoint_io, remove_orphaned_checkpoints
from ..data.batch import generation_prompt, is_generation_batch
from ..data.templates import TASKS, extract_answer
from ..data.tokenizer import load_tokenizer
from ..losses import find_loss_head, install_chunked_loss_head
from ..metrics import TaskAccuracy, format_table
from ..strategies import AdapterModelParallelStrategy, check_checkpoint_keys, describe_adapter
from .settings import check_reducer, check_settings, check_token_ids
from .sharding import (
    fsdp1_rank0_load_kwargs,
    fsdp1_wrap_policy,
    gathered_for_export,
    materialize_from_rank0,
    shard_model,
)

__all__ = ["CausalLMModule", "load_causal_lm"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONTENTS_KEY = "effilora_lightning"  # checkpoint entry: the adapter config and the saved keys with their shapes


def load_causal_lm(
    model_path: str | None, model_config: dict[str, Any] | None, dtype: str, seed: int, meta: bool = False
) -> PreTrainedModel:
    """From a local Hugging Face directory (``local_files_only``), or built from a config dict (random init).

    ``meta=True`` builds the architecture only, on the meta device (no weights read, no memory used).
    """
    torch_dtype = _DTYPES[dtype]
    if model_path is not None:
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"No model at {path} (config.json missing). Models load from local directories only; no download "
                "is attempted. Point model_path at a Hugging Face checkpoint directory (e.g. data/checkpoints/tiny-llama)."
            )
        if meta:
            with torch.device("meta"):
                config = AutoConfig.from_pretrained(str(path), local_files_only=True)
                return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors_file(weights)  # a truncated shard, named, before transformers reads it
        try:
            return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch_dtype)
        except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as err:
            raise ValueError(f"The model in {path} cannot be loaded: {type(err).__name__}: {err}") from err
    if model_config is None:
        raise ValueError("Give model_path (a local checkpoint directory) or model_config (a config dict).")
    cfg = dict(model_config)
    config = AutoConfig.for_model(cfg.pop("model_type", "llama"), **cfg)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)


class CausalLMModule(pl.LightningModule):
    """Adapter fine-tuning of a causal LM, with generation-based accuracy on commonsense tasks.

    Args:
        adapter: LoRAConfig, EffiLoRAConfig, HydraLoRAConfig or LilyConfig (``class_path`` in YAML).
        model_path: local Hugging Face checkpoint directory (config.json, tokenizer, safetensors).
        model_config: instead of model_path, a config dict to build a randomly initialised model.
        dtype: dtype of the frozen base weights (adapters stay fp32 unless the adapter says otherwise).
        learning_rate: default learning rate of every adapter group.
        lr_shared_a / lr_b / lr_router: per-group overrides (None = learning_rate).
        weight_decay: AdamW decoupled weight decay on adapter weights.
        scheduler: ``cosine`` or ``linear`` decay after warm-up, or ``constant``.
        warmup_steps: linear warm-up, in optimizer steps (int) or as a share of all steps (float < 1).
        min_lr_ratio: the decay ends at learning_rate * min_lr_ratio.
        gradient_checkpointing: non-reentrant activation checkpointing (reentrant would starve adapters).
        max_new_tokens / num_beams: generation for accuracy (reference: 32 tokens, 4 beams).
        reducer: EffiLoRACallback arguments, used when the adapter is EffiLoRA (None = defaults).
        load_adapter_from: initialise the adapter from a directory written by ``save_adapter``.
        export_dir: at the end of fit, write ``<export_dir>/adapter`` and, where possible, ``<export_dir>/peft``.
        fsdp_param_dtype: under ModelParallelStrategy (FSDP2), the all-gather/compute dtype (``bfloat16`` on
            GPUs); gradients are always reduced in fp32.
        init_seed: seeds model_config initialisation (adapter init is seeded by the adapter config).
        chunked_loss: compute the training/validation loss with the LM head and cross-entropy fused per chunk
            of ``loss_chunk_size`` tokens (``effilora_lightning.losses``): never the (tokens x vocab) logits, same
            loss and gradients as HF's. False: HF's own ``labels=`` loss. Generation is the same either way.
        loss_chunk_size: tokens per chunk of the chunked loss (chunk x vocab fp32 logits exist at once).
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
        scheduler: Literal["cosine", "linear", "constant"] = "cosine",
        warmup_steps: int | float = 0,
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        reducer: dict[str, Any] | None = None,
        load_adapter_from: str | None = None,
        export_dir: str | None = None,
        fsdp_param_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        init_seed: int = 0,
        chunked_loss: bool = True,
        loss_chunk_size: int = 1024,
    ) -> None:
        super().__init__()
        if isinstance(loss_chunk_size, bool) or not isinstance(loss_chunk_size, int) or loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be an integer >= 1 (tokens per chunk of the chunked loss), "
                             f"got {loss_chunk_size!r}")
        if adapter is None and self.requires_adapter:
            raise ValueError(f"{type(self).__name__} needs an adapter config (LoRAConfig, EffiLoRAConfig, ...).")
        if adapter is not None and not isinstance(adapter, AdapterConfig):
            raise TypeError(f"adapter must be an adapter config (LoRAConfig, EffiLoRAConfig, ...), got {type(adapter).__name__}.")
        if model_path is None and model_config is None:
            raise ValueError("CausalLMModule needs model_path (a local checkpoint directory) or model_config.")
        self.save_hyperparameters(ignore=["adapter"])
        check_settings(type(self).__name__, self.hparams)
        reducer = check_reducer(reducer)  # names and types, before the callback sees them
        self.adapter = adapter
        self.reducer = _build_reducer(reducer) if isinstance(adapter, EffiLoRAConfig) else None
        self.strict_loading = False  # checkpoints hold adapter weights only
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.val_accuracy = TaskAccuracy(TASKS)
        self.test_accuracy = TaskAccuracy(TASKS)
        self.test_results: dict[str, float] = {}

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return  # Lightning may call this more than once
        self._configure_model()
        self.check_inputs_fit_model()

    def _configure_model(self) -> None:
        hp = self.hparams
        self._check_strategy()
        mesh = getattr(self, "_device_mesh", None)  # set by ModelParallelStrategy (FSDP2)
        if mesh is not None and hp.model_path is not None:
            self.model = self._build_sharded(mesh["data_parallel"])
            return
        fsdp1 = self._fsdp1_strategy()
        rank0_load = fsdp1 is not None and _fsdp1_can_load_on_rank0(fsdp1, hp.model_path)
        self.model = self._build_adapted(meta=rank0_load and not self._trainer.is_global_zero)
        if mesh is not None:
            shard_model(self.model, mesh["data_parallel"], hp.fsdp_param_dtype, extra_units=self.extra_fsdp_units())
        if fsdp1 is not None:
            self._configure_fsdp1(fsdp1, rank0_load)

    def _fsdp1_strategy(self) -> Any:
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        return strategy if isinstance(strategy, FSDPStrategy) else None

    def _configure_fsdp1(self, strategy: Any, rank0_load: bool) -> None:
        """FSDP1 arguments the user left open: our wrap policy (``fsdp1_wrap_policy``: frozen leaves, blocks,
        root) instead of Lightning's one unit for the whole model; and with ``rank0_load`` (only rank 0 read the
        checkpoint, the others built on the meta device) ``sync_module_states`` to broadcast rank 0's weights
        into every rank's shards, after ``param_init_fn`` gave the meta modules empty storage."""
        if strategy.kwargs.get("auto_wrap_policy") is None:
            strategy.kwargs["auto_wrap_policy"] = fsdp1_wrap_policy(self.model, self.extra_fsdp_units())
            rank_zero_info("FSDPStrategy: no auto_wrap_policy given; using effilora_lightning's fsdp1_wrap_policy "
                           "(frozen leaves, then blocks, then the root, each its own unit).")
        if rank0_load:
            strategy.kwargs.update(fsdp1_rank0_load_kwargs(strategy.root_device))

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The matmul dtype when FSDP2 all-gathers in ``fsdp_param_dtype`` (EffiLoRACallback's MFU reads it);
        None: the precision plugin's dtype applies."""
        sharded = getattr(self, "_device_mesh", None) is not None and self.hparams.fsdp_param_dtype is not None
        return getattr(torch, self.hparams.fsdp_param_dtype) if sharded else None

    def _build_adapted(self, meta: bool = False) -> PreTrainedModel:
        """Base model (train mode) + adapter (+ saved adapter weights) + activation checkpointing."""
        hp = self.hparams
        model = self.build_base_model(meta)
        model.train()  # from_pretrained returns eval mode; adapter dropout must be live
        self.adapter_report = apply_adapter(model, self.adapter)
        rank_zero_info(str(self.adapter_report))
        self._install_loss_head(model)
        if hp.load_adapter_from and not meta:
            from ..adapters import load_adapter

            load_adapter(model, hp.load_adapter_from)
        if hp.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def _build_sharded(self, mesh: Any) -> PreTrainedModel:
        """FSDP2 without N copies in RAM: every rank builds the adapted model on the meta device and shards
        it; rank 0 alone loads the checkpoint (and initialises the adapter, seeded) and broadcasts it."""
        model = self._build_adapted(meta=True)
        shard_model(model, mesh, self.hparams.fsdp_param_dtype, extra_units=self.extra_fsdp_units())
        full = self._build_adapted().state_dict() if self._trainer.is_global_zero else {}
        materialize_from_rank0(model, full, self._trainer.strategy.root_device)
        return model

    def extra_fsdp_units(self) -> list[torch.nn.Module]:
        """Blocks besides the decoder layers that get their own FSDP2 group (VisionLanguageModule: none)."""
        return []

    def _check_strategy(self) -> None:
        """Refuse, at start, what a strategy cannot do, naming the alternative."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDPStrategy) and not strategy.kwargs.get("use_orig_params", False):
            raise ValueError(
                "FSDPStrategy (FSDP1) with adapters needs use_orig_params=True (frozen base and trainable adapters "
                "share FSDP units). Set strategy.init_args.use_orig_params: true, or use ModelParallelStrategy "
                "(FSDP2, preferred)."
            )
        if isinstance(strategy, FSDPStrategy) and getattr(strategy, "_state_dict_type", "full") == "sharded":
            raise ValueError(
                "FSDPStrategy (FSDP1) with state_dict_type='sharded' reloads every key of the model, and our checkpoints "
                "hold the adapter only, so such a run could not resume. Use state_dict_type='full' (one adapter-only "
                "file, written by rank 0), or effilora_lightning.AdapterModelParallelStrategy (FSDP2, sharded "
                "adapter-only checkpoints)."
            )
        if _saves_full_shards(strategy):
            rank_zero_warn(
                "ModelParallelStrategy(save_distributed_checkpoint=True) can only resume from sharded checkpoints "
                "holding the whole model, so each checkpoint will also hold the frozen base weights. Use "
                "effilora_lightning.strategies.AdapterModelParallelStrategy (same arguments) for adapter-only ones."
            )

    def build_base_model(self, meta: bool = False) -> PreTrainedModel:
        """The frozen base LM (on the meta device if asked); VisionLanguageModule overrides this."""
        hp = self.hparams
        return load_causal_lm(hp.model_path, hp.model_config, hp.dtype, hp.init_seed, meta=meta)

    def configure_callbacks(self) -> list[pl.Callback]:
        """EfficiencyMonitor (perf/*) for every adapter method, beside EffiLoRACallback for EffiLoRA; the monitor
        takes ``log_every_n_steps`` and ``peak_flops`` from the ``reducer`` block."""
        from ..callbacks import EfficiencyMonitor

        reducer = self.hparams.get("reducer") or {}
        monitor = EfficiencyMonitor(reducer.get("log_every_n_steps"), reducer.get("peak_flops"))
        return [self.reducer, monitor] if self.reducer is not None else [monitor]

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.tokenizer = getattr(dm, "tokenizer", None)  # else loaded from model_path when generation needs it
        if self._trainer is not None:
            install_checkpoint_io(self._trainer.strategy)  # temp files beside the target, broken files named
            ckpt_path = getattr(self._trainer, "ckpt_path", None)
            if ckpt_path is not None and "://" not in str(ckpt_path):  # every strategy, also those (FSDP1,
                check_checkpoint_file(ckpt_path)  # ModelParallelStrategy) that read the file without our IO
        if self.model is not None:  # configured before the Trainer got it; else configure_model checks
            self.check_inputs_fit_model()

    def check_inputs_fit_model(self) -> None:
        """Before any step, once the model exists: every special token id the data uses has an input embedding
        (VisionLanguageModule adds the image size). Without a tokenizer (no datamodule), nothing to check."""
        if self.tokenizer is None or self.model is None:
            return
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        template = getattr(dm, "template", None)
        extra = (*getattr(template, "special_tokens", ()), getattr(template, "end_of_turn", None))
        embeddings = getattr(self.model, "language_model", self.model).get_input_embeddings()
        check_token_ids(self.tokenizer, embeddings.num_embeddings, extra,
                        where=f"the model ({self.hparams.model_path or 'model_config'})")

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    # ------------------------------------------------------------------ steps
    def _install_loss_head(self, model: PreTrainedModel) -> None:
        """With ``chunked_loss``, swap the LM head for a ``ChunkedLossHead`` holding the same parameters (before
        any sharding); ``_lm_loss`` then gets the loss from the model's own forward, through FSDP's hooks."""
        if self.hparams.chunked_loss:
            install_chunked_loss_head(model, self.hparams.loss_chunk_size, on_skip=rank_zero_info)

    def _lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token loss of a teacher-forced batch: chunked (no full logits) when the head was swapped."""
        head = find_loss_head(self.model)
        if head is None:
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss
        with head.computing_loss(batch["labels"]):  # the head returns the loss as HF's `logits`
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._lm_loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["input_ids"].shape[0])
        self.log_padding_fraction(batch)
        return loss

    def log_padding_fraction(self, batch: dict[str, Any]) -> None:
        """``perf/padding_fraction``: padding / all positions of this rank's (B, T) token batch, each image one
        position (a device tensor: no host sync here; the logger reads it every log_every_n_steps)."""
        mask = batch["attention_mask"]
        self.log("perf/padding_fraction", 1.0 - mask.float().mean(), on_step=True, on_epoch=False,
                 batch_size=mask.shape[0])

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if is_generation_batch(batch):
            self._score_generation(batch, self.val_accuracy)
            return
        loss = self._lm_loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, add_dataloader_idx=False,
                 batch_size=batch["input_ids"].shape[0])

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._score_generation(batch, self.test_accuracy)

    @torch.no_grad()
    def generate_answers(self, batch: dict[str, Any]) -> list[str]:
        """Greedy (or beam) generation from left-padded prompts; returns prompt + generation decoded per row.

        The prompt is decoded too, as LLM-Adapters' commonsense_evaluate.py does: the answer is read from the
        segment right after the PROMPT's "### Response:" up to the next one the model may write
        (``templates.response_text``); decoding the new tokens alone would read past a repeated marker.
        """
        tok = self._require_tokenizer()
        prompt_ids, prompt_mask = generation_prompt(batch)  # (B, P) each, left-padded
        out = self.model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask,
            max_new_tokens=self.hparams.max_new_tokens, num_beams=self.hparams.num_beams, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        width = prompt_ids.shape[1]  # (B, width + new tokens): prompts are left-padded
        starts = (width - prompt_mask.sum(dim=1)).tolist()  # one host copy per batch
        return tok.batch_decode([row[start:] for row, start in zip(out, starts)], skip_special_tokens=True)

    def _score_generation(self, batch: dict[str, Any], metric: TaskAccuracy) -> None:
        texts = self.generate_answers(batch)
        correct = [(extract_answer(t, text) or "").lower() == a.lower()
                   for t, text, a in zip(batch["task"], texts, batch["answer"])]
        metric.update(batch["task"], torch.tensor(correct, device=self.device), batch["sample_id"])

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None and self.hparams.model_path is not None:
            self.tokenizer = load_tokenizer(self.hparams.model_path)
        if self.tokenizer is None:
            raise RuntimeError("Generation needs a tokenizer: use a datamodule with a .tokenizer, or set model_path.")
        return self.tokenizer

    # ------------------------------------------------------------------ epoch ends
    def on_validation_epoch_end(self) -> None:
        if self.val_accuracy.update_count == 0:
            return
        results = self.val_accuracy.compute()
        self.log_dict({f"val_acc/{k}": v for k, v in results.items()}, sync_dist=False)
        self.log("val_acc", results["average"], prog_bar=True)
        self.val_accuracy.reset()

    def on_test_epoch_end(self) -> None:
        results = self.test_accuracy.compute()
        counts = self.test_accuracy.counts()
        self.log_dict({f"test_acc/{k}": v for k, v in results.items()})
        self._report_test(results, counts)

    def _report_test(self, results: dict[str, Any], counts: dict[str, int]) -> None:
        """Keep the accuracies (``test_results``); rank 0 prints the table and writes test_results.json to the
        log dir. Every rank must get here: finding the log dir is a broadcast under distributed strategies."""
        self.test_results = {k: float(v) for k, v in results.items()}
        self.test_accuracy.reset()
        path = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "test_results.json"
        if self.trainer.is_global_zero:
            print("\n" + format_table(results, counts) + "\n")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"accuracy": self.test_results, "counts": counts}, indent=2) + "\n")

    # ------------------------------------------------------------------ FSDP1: evaluating after fit
    def on_fit_start(self) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.strategy.model
        # in __dict__, not as an attribute: nn.Module would register the wrapper (which wraps self) as a child
        self.__dict__["_fsdp1_root"] = root if isinstance(root, FullyShardedDataParallel) else None
        self._check_eval_prompts_fit()

    def on_validation_start(self) -> None:
        self._reuse_fsdp1_root()
        self._check_eval_prompts_fit()

    def on_test_start(self) -> None:
        self._reuse_fsdp1_root()
        self._check_eval_prompts_fit()

    def _check_eval_prompts_fit(self) -> None:
        """Before any step: the longest generation prompt plus ``max_new_tokens`` must fit the model's context
        (eval prompts are never cut). A datamodule without ``longest_eval_prompt`` is not checked."""
        longest = getattr(getattr(self.trainer, "datamodule", None), "longest_eval_prompt", None)
        context = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if longest is None or not isinstance(context, int):
            return
        length, task, index = longest
        if length + self.hparams.max_new_tokens > context:
            raise ValueError(
                f"eval task {task}: record {index} is a {length}-token prompt; with max_new_tokens="
                f"{self.hparams.max_new_tokens} it needs {length + self.hparams.max_new_tokens} positions, more than "
                f"the model's context (max_position_embeddings={context}). Eval prompts are never cut: lower "
                f"max_new_tokens, drop the record, or use a model with a longer context."
            )

    def on_predict_start(self) -> None:
        self._reuse_fsdp1_root()

    def _reuse_fsdp1_root(self) -> None:
        """``trainer.test`` (``test_after_fit``) after an FSDP1 fit in the same process: Lightning finds the
        decoder-layer units from the fit, takes the model for manually wrapped and leaves it without a root
        wrapper, so the root's parameters (embeddings, head, shared A) would stay flat shards and the first
        forward fails. Hand Lightning the root wrapper of the fit back: steps then run through it, as in fit."""
        root = getattr(self, "_fsdp1_root", None)
        if root is not None and self._fsdp1_strategy() is not None and self.trainer.strategy.model is self:
            self.trainer.strategy.model = root

    def on_train_start(self) -> None:
        remove_orphaned_checkpoints(self.trainer)  # resumed from last.ckpt: files the killed run wrote after it

    def on_train_end(self) -> None:
        if self.hparams.export_dir is None:
            return
        out = Path(self.hparams.export_dir)
        with gathered_for_export(self.trainer.strategy.model):
            save_adapter(self.model, out / "adapter")
            if self.adapter.method == "lora" or (self.adapter.method == "effilora" and self.adapter.num_heads == 1):
                export_peft_lora(self.model, out / "peft", base_model_name_or_path=self.hparams.model_path)
        rank_zero_info(f"Adapter written to {out}")

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """Every adapter parameter (by name, frozen ones too) in fixed named groups with their own lr."""
        hp = self.hparams
        lrs = {"shared_a": hp.lr_shared_a, "a": None, "b": hp.lr_b, "router": hp.lr_router}
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if is_adapter_param(name):
                groups.setdefault(param_group(name) or "b", []).append(p)
        # `is None`, not `or`: lr_b: 0.0 freezes that group, it does not fall back to learning_rate
        return [{"name": g, "params": ps, "lr": hp.learning_rate if lrs.get(g) is None else lrs[g]}
                for g, ps in groups.items()]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.param_groups(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = hp.warmup_steps if isinstance(hp.warmup_steps, int) else int(hp.warmup_steps * total)
        schedule = LambdaLR(optimizer, _lr_lambda(hp.scheduler, warmup, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by the GLOBAL norm under FSDP1 too: Lightning's FSDP precision plugin refuses norm clipping, and a
        rank clipping its own shard by its shard's norm would clip each rank differently. The root
        FullyShardedDataParallel's ``clip_grad_norm_`` all-reduces the norm; other strategies take Lightning's path."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.strategy.model
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(root, FullyShardedDataParallel):
            root.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what ``in_checkpoint`` accepts (adapter weights): base weights reload from model_path (or are
        rebuilt from model_config), so checkpoints stay small and every rank writes only adapter shards.

        Except for sharded checkpoints written by Lightning's own ModelParallelStrategy: it reloads every key of
        the model and would miss the base keys, so there each rank keeps its 1/N shard of everything.
        AdapterModelParallelStrategy loads adapter-only sharded checkpoints.
        """
        if self._trainer is not None and _saves_full_shards(self._trainer.strategy):
            return
        state = checkpoint["state_dict"]
        for key in [k for k in state if not self.in_checkpoint(k)]:
            del state[key]
        # what the checkpoint holds, beside the weights: checked on load under every strategy (FSDP ones load
        # single files themselves and hand on_load_checkpoint no state_dict)
        checkpoint[CONTENTS_KEY] = {"adapter": self.adapter.to_dict() if self.adapter is not None else None,
                                    "keys": {k: list(v.shape) for k, v in state.items() if torch.is_tensor(v)}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose saved keys are not the ones this model saves (fit, validate and test alike),
        naming the missing and unexpected keys and the adapter it holds. Lightning loads non-strictly (base
        weights are not in checkpoints), so a LoRA checkpoint would otherwise load into an EffiLoRA model as
        nothing at all, and a resume would fail later on the optimizer's parameter groups."""
        if self.model is None or (self._trainer is not None and _saves_full_shards(self._trainer.strategy)):
            return
        contents = checkpoint.get(CONTENTS_KEY) or {}
        if "keys" in contents:
            saved: dict[str, Any] = {k: torch.Size(v) for k, v in contents["keys"].items()}
        elif isinstance(checkpoint.get("state_dict"), dict):
            saved = {k: v.shape if torch.is_tensor(v) else None for k, v in checkpoint["state_dict"].items()}
        else:
            return  # a sharded checkpoint: AdapterModelParallelStrategy checked its keys while loading
        model = self._state_shapes()
        if any(shape is None for shape in model.values()):  # FSDP1: flat shards, names only
            saved = dict.fromkeys(saved)
        path = (self._trainer.ckpt_path if self._trainer is not None else None) or "being loaded"
        check_checkpoint_keys(saved, model, [k for k in model if self.in_checkpoint(k)], path,
                              holds=describe_adapter(contents.get("adapter"), saved),
                              expects=describe_adapter(self.adapter.to_dict() if self.adapter else None, ()))

    def _state_shapes(self) -> dict[str, torch.Size | None]:
        """State-dict key -> global shape; under FSDP1 names only (its parameters are flat shards here)."""
        if self._fsdp1_strategy() is None:
            return {k: v.shape if torch.is_tensor(v) else None for k, v in self.state_dict().items()}
        named = [*self.named_parameters(remove_duplicate=False), *self.named_buffers(remove_duplicate=False)]
        return {unwrapped_name(n): None for n, _ in named}

    def in_checkpoint(self, key: str) -> bool:
        """Whether a state-dict key is saved in checkpoints (and so required when resuming from one)."""
        return is_adapter_param(key) or self.keep_in_checkpoint(key)

    def keep_in_checkpoint(self, key: str) -> bool:
        """Non-adapter weights that still train (VisionLanguageModule keeps its projector)."""
        return False


def _build_reducer(reducer: dict[str, Any]) -> EffiLoRACallback:
    """EffiLoRACallback.from_config(SelectionConfig(...), **the rest) from the ``reducer`` block; ``peak_flops`` is
    checked here and goes to the EfficiencyMonitor (configure_callbacks). Range errors say where the value came from."""
    from ..callbacks.monitor import check_peak_flops
    from ..selection.config import SETTINGS, SelectionConfig, SelectionValueError

    try:
        check_peak_flops(reducer.get("peak_flops"))
        config = SelectionConfig(**{k: v for k, v in reducer.items() if k in SETTINGS})
        logging = {k: v for k, v in reducer.items() if k not in SETTINGS and k != "peak_flops"}
        return EffiLoRACallback.from_config(config, **logging)
    except SelectionValueError as err:
        raise ValueError(f"reducer: {err.named('EffiLoRACallback')}") from None
    except ValueError as err:
        raise ValueError(f"reducer: {err}") from None


def _fsdp1_can_load_on_rank0(strategy: Any, model_path: str | None) -> bool:
    """Rank 0 alone reads the checkpoint when there is one, several ranks, and the user set neither
    ``sync_module_states=False`` nor a ``param_init_fn`` of their own (then every rank loads it, as before)."""
    kwargs = strategy.kwargs
    return (model_path is not None and strategy.world_size > 1 and kwargs.get("sync_module_states", True) is not False
            and kwargs.get("param_init_fn") is None)


def _saves_full_shards(strategy: object) -> bool:
    """Lightning's ModelParallelStrategy writing sharded checkpoints: it can only resume from full ones."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return (
        isinstance(strategy, ModelParallelStrategy)
        and not isinstance(strategy, AdapterModelParallelStrategy)
        and strategy._save_distributed_checkpoint
    )


def _lr_lambda(kind: str, warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * decay

    return factor
