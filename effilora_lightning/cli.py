"""The ``effilora`` command: LightningCLI over our modules and datamodules.

    effilora fit --config configs/demo/commonsense_effilora.yaml
    effilora fit --config configs/demo/commonsense_effilora.yaml --model.adapter.rank 8 --trainer.max_steps 50
    effilora test --config ... --ckpt_path logs/.../checkpoints/last.ckpt
    python -m effilora_lightning fit --config ...

``model`` and ``data`` take a ``class_path`` (CausalLMModule / VisionLanguageModule, CommonsenseDataModule /
VisualInstructionDataModule), and so does ``model.adapter`` (LoRAConfig, EffiLoRAConfig, HydraLoRAConfig,
LilyConfig): switching methods is one line of YAML.
"""

from __future__ import annotations

import os
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .adapters import AdapterConfig

__all__ = ["EffiLoRACLI", "main", "run"]


class EffiLoRACLI(LightningCLI):
    """LightningCLI plus ``--test_after_fit``: evaluate on the test tasks right after training."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="After fit, run test with the trained weights and print the per-task table.")

    def instantiate_classes(self) -> None:
        """As LightningCLI, but a module's or datamodule's own ValueError/TypeError (which names the key at fault)
        is raised as it is, not inside jsonargparse's "Does not validate against any of the Union subtypes"."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            cause = _innermost_named_error(err)
            if cause is not None:
                raise cause from None
            raise

    def after_fit(self) -> None:
        if self.config.get(self.subcommand, {}).get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


def _innermost_named_error(err: BaseException) -> BaseException | None:
    """The deepest ValueError/TypeError under ``err`` whose message ``err`` repeats: a config's own error (e.g.
    ``SelectionConfig(keep_ratio=2.0): must be in (0, 1].``) under jsonargparse's Union and nesting wrappers."""
    found, seen = None, set()
    cause = err.__cause__ or err.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (ValueError, TypeError)) and str(cause) and str(cause) in str(err):
            found = cause
        cause = cause.__cause__ or cause.__context__
    return found


def main(args: list[str] | None = None) -> None:
    """Console entry point (``effilora``). Destroys the process group the run made before the interpreter exits,
    as PyTorch asks: left to interpreter finalization, the communicator's C++ threads can abort the process
    after the run has finished (seen with gloo as "terminate called without an active exception")."""
    run(args)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run(args: list[str] | None = None, **kwargs: Any) -> EffiLoRACLI:
    """Build and run the CLI; returns it so that tests can look at the trainer and model."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_parsing_settings(subclasses_enabled=[AdapterConfig])  # dataclass configs chosen by class_path
    defaults: dict[str, Any] = {
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}},
    }
    return EffiLoRACLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=defaults,
        args=args,
        **kwargs,
    )
