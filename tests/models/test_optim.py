"""The optimizer the modules build: torch's AdamW with its implementation named (``models.optim.adamw``)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from effilora_lightning import CausalLMModule, LoRAConfig
from effilora_lightning.models import optim

TINY = Path(__file__).resolve().parents[2] / "data" / "checkpoints" / "tiny-llama"


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(16, 64), (64, 16), (8,), (3, 5)]]


def _run(implementation: str, steps: int = 6) -> tuple[list[torch.Tensor], list[dict]]:
    """Two groups with their own lr and decay; parameter 1 has no gradient on odd steps (a frozen B)."""
    params = _params()
    opt = optim.adamw([{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3}], 5e-3,
                      weight_decay=0.1, implementation=implementation)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (i == 1 and step % 2) else torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach() for p in params], [opt.state[p] for p in params]


def test_foreach_is_the_for_loop_bit_for_bit_and_fused_is_within_rounding():
    loop, loop_state = _run("for_loop")
    foreach, foreach_state = _run("foreach")
    fused, _ = _run("fused")
    assert all(torch.equal(a, b) for a, b in zip(loop, foreach))
    for a, b in zip(loop_state, foreach_state):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert float(a["step"]) == float(b["step"])
    assert float(loop_state[1]["step"]) == 3.0  # skipped on the steps it had no gradient, in every implementation
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(loop, fused))
    assert not all(torch.equal(a, b) for a, b in zip(loop, fused))  # fused rounds differently: the docs say so


@pytest.mark.parametrize("implementation", optim.ADAMW_IMPLEMENTATIONS)
def test_the_module_builds_the_implementation_it_is_given(implementation, tmp_path):
    module = CausalLMModule(adapter=LoRAConfig(rank=2), model_path=str(TINY), adamw_implementation=implementation)
    module.configure_model()
    module.trainer = pl.Trainer(accelerator="cpu", max_steps=10, logger=False, default_root_dir=tmp_path)
    group = module.configure_optimizers()["optimizer"].param_groups[0]
    assert (group["foreach"], group["fused"]) == (implementation == "foreach", implementation == "fused")


def test_the_default_is_fused_and_a_misspelt_name_is_refused_up_front():
    assert CausalLMModule(adapter=LoRAConfig(), model_path=str(TINY)).hparams.adamw_implementation == "fused"
    assert optim.adamw(_params(), 1e-3).param_groups[0]["fused"] is True
    with pytest.raises(ValueError, match=r"^CausalLMModule: adamw_implementation must be fused, foreach or "
                                         r"for_loop, got 'fuse'"):
        CausalLMModule(adapter=LoRAConfig(), model_path=str(TINY), adamw_implementation="fuse")
    with pytest.raises(ValueError, match="adamw_implementation must be one of fused, foreach, for_loop"):
        optim.adamw(_params(), 1e-3, implementation="loop")
