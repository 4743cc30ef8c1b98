"""The `effilora` command: the demo config parses and runs a few steps, overrides, errors, resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from effilora_lightning.cli import run

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "commonsense_effilora.yaml"
QUICK = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false",
         "--data.init_args.max_test_samples_per_task", "2", "--data.init_args.val_generation_samples_per_task", "1",
         "--data.init_args.val_set_size", "8", "--trainer.enable_model_summary", "false"]


@pytest.fixture
def in_repo(monkeypatch, tmp_path):
    """Run from the repository root (configs use relative paths) but log into tmp_path."""
    monkeypatch.chdir(ROOT)
    ckpt = ('[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
            f'"init_args": {{"dirpath": "{tmp_path / "ckpt"}", "save_last": true, "every_n_train_steps": 3}}}}]')
    return ["--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--trainer.callbacks", ckpt]


@pytest.mark.parametrize("config", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_config_opens_with_its_command_and_parses(config, monkeypatch, capsys):
    first = config.read_text().splitlines()[0]
    assert first.startswith("#") and ("effilora" in first or "torchrun" in first or "sbatch" in first), first
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        run(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code == 0
    assert "class_path: effilora_lightning." in capsys.readouterr().out


def test_demo_fits_tests_and_resumes_from_last(in_repo, tmp_path):
    cli = run(["fit", "--config", str(DEMO), *QUICK, *in_repo])
    assert cli.trainer.global_step == 3
    assert cli.model.test_results and "average" in cli.model.test_results  # test_after_fit ran
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    resumed = run(["fit", "--config", str(DEMO), *QUICK, *in_repo, "--trainer.max_steps", "4",
                   "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--test_after_fit", "false"])
    assert resumed.trainer.global_step == 4
    assert len(resumed.model.reducer.history) == 4  # the selection history carried over


def test_method_switch_is_one_line(in_repo):
    cli = run(["fit", "--config", str(DEMO), *QUICK, *in_repo, "--model.init_args.adapter.class_path",
               "effilora_lightning.LoRAConfig", "--test_after_fit", "false", "--trainer.max_steps", "1"])
    assert cli.model.adapter.method == "lora" and cli.model.reducer is None


def test_one_row_packing_is_two_lines_of_yaml(in_repo):
    """pack_width of the whole batch and attn_implementation: sdpa_packed, from the command line: the model has it
    and the training batches hold their 16 samples without padding (one row, or narrower rows that tie with it)."""
    cli = run(["fit", "--config", str(DEMO), *QUICK, *in_repo, "--test_after_fit", "false", "--trainer.max_steps", "2",
               "--data.init_args.pack_sequences", "true", "--data.init_args.pack_width", "2048",
               "--model.init_args.attn_implementation", "sdpa_packed"])
    assert cli.trainer.global_step == 2 and cli.model.model.config._attn_implementation == "sdpa_packed"
    for _, batch in zip(range(3), cli.datamodule.train_dataloader()):
        assert bool(batch["attention_mask"].all())
        assert sum(len(row) for row in batch["packed_segments"]) == batch["num_samples"] == 16


def test_unknown_key_is_rejected_by_name(in_repo, capsys):
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(DEMO), "--model.init_args.adapter.init_args.rnak", "4"])
    assert "rnak" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "effilora_lightning", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0 and "fit" in done.stdout


def test_the_console_entry_point_destroys_the_process_group_it_leaves(monkeypatch, tmp_path):
    """``effilora`` (cli.main) tears down a process group the run initialized (here a 1-rank gloo group standing in
    for a strategy's), so that no communicator is left to interpreter finalization."""
    import torch.distributed as dist

    from effilora_lightning import cli

    def fake_run(args):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    monkeypatch.setattr(cli, "run", fake_run)
    cli.main([])
    assert not dist.is_initialized()
    monkeypatch.setattr(cli, "run", lambda args: None)
    cli.main([])  # a run that made no group: nothing to destroy, no error
    assert not dist.is_initialized()
