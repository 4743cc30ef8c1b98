"""GenerationEvalModule: what both task modules share to score generated answers: per-task accuracy states
deduplicated by integer sample id (``metrics.TaskAccuracy``), the tokenizer, the up-front check that every
prompt plus ``max_new_tokens`` fits the context, and the end-of-test table and ``test_results.json``.

A task module adds ``generate_answers(batch)`` and ``is_correct(task, text, answer)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.tokenizer import load_tokenizer
from ..metrics import TaskAccuracy, format_table
from .finetune import FineTuneModule

__all__ = ["GenerationEvalModule"]


class GenerationEvalModule(FineTuneModule):
    """FineTuneModule + accuracy of generated answers on ``tasks`` (see the module docstring)."""

    tasks: Sequence[str] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_accuracy = TaskAccuracy(list(self.tasks))
        self.test_accuracy = TaskAccuracy(list(self.tasks))
        self.test_results: dict[str, float] = {}

    # ------------------------------------------------------------------ what a task provides
    def generate_answers(self, batch: dict[str, Any]) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def is_correct(self, task: str, text: str, answer: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ scoring
    def score(self, batch: dict[str, Any], metric: TaskAccuracy) -> None:
        """Generate for a generation batch and count each answer once per integer sample id."""
        texts = self.generate_answers(batch)
        correct = [self.is_correct(t, text, a) for t, text, a in zip(batch["task"], texts, batch["answer"])]
        metric.update(batch["task"], torch.tensor(correct, device=self.device), batch["sample_id"])

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None and self.hparams.model_path is not None:
            self.tokenizer = load_tokenizer(self.hparams.model_path)
        if self.tokenizer is None:
            raise RuntimeError("Generation needs a tokenizer: use a datamodule with a .tokenizer, or set model_path.")
        return self.tokenizer

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._check_eval_prompts_fit()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._check_eval_prompts_fit()

    def on_test_start(self) -> None:
        super().on_test_start()
        self._check_eval_prompts_fit()

    def on_validation_epoch_end(self) -> None:
        if self.val_accuracy.update_count == 0:
            return
        results = self.val_accuracy.compute()
        self.log_val_accuracy(results)
        self.val_accuracy.reset()

    def log_val_accuracy(self, results: dict[str, Any]) -> None:
        self.log_dict({f"val_acc/{k}": v for k, v in results.items()}, sync_dist=False)
        self.log("val_acc", results["average"], prog_bar=True)

    def on_test_epoch_end(self) -> None:
        results = self.test_accuracy.compute()
        counts = self.test_accuracy.counts()
        self.log_test_accuracy(results)
        self._report_test(results, counts)

    def log_test_accuracy(self, results: dict[str, Any]) -> None:
        self.log_dict({f"test_acc/{k}": v for k, v in results.items()})

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
