"""benchmarks/choice_scoring.py: candidates from the instruction, scores that ignore padding, argmax semantics."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from effilora_lightning.data.commonsense_prompts import build_train_prompt

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "data/checkpoints/tiny-llama"
pytestmark = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="data/checkpoints/tiny-llama not built")


def _load():
    spec = importlib.util.spec_from_file_location("benchmarks_choice_scoring", ROOT / "benchmarks/choice_scoring.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cs = _load()


def _record(answer: str = "solution2") -> dict[str, str]:
    return {"instruction": "Please choose: how?\n\nSolution1: Eat.\n\nSolution2: Ride.\n\nAnswer format: solution1/solution2",
            "output": f"the correct answer is {answer}", "answer": answer}


class _Prefers(torch.nn.Module):
    """A 'model' whose next-token logits always favour one token id."""

    def __init__(self, token: int, vocab: int) -> None:
        super().__init__()
        self.token, self.vocab = token, vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = 5.0
        return SimpleNamespace(logits=logits)


def test_candidates_come_from_the_answer_format_line():
    assert cs.candidates(_record()) == ["solution1", "solution2"]
    with pytest.raises(ValueError, match="Answer format"):
        cs.candidates({"instruction": "no format here"})


def test_choice_is_the_candidate_the_model_prefers(tmp_path):
    tok = AutoTokenizer.from_pretrained(TINY)
    one, two = (tok(f"x solution{i}").input_ids[-1] for i in (1, 2))
    assert one != two
    task = tmp_path / "piqa"
    task.mkdir()
    (task / "test.json").write_text(json.dumps([_record("solution2"), _record("solution1")]))
    acc = cs.choice_accuracy(_Prefers(two, len(tok)), tok, tmp_path, ["piqa"], build_train_prompt)
    assert acc == {"piqa": 0.5, "average": 0.5}  # always picks solution2: right once, wrong once
    loss = cs.answer_loss(_Prefers(two, len(tok)), tok, [_record("solution2")], build_train_prompt)
    lp = torch.log_softmax(torch.tensor([5.0] + [0.0] * (len(tok) - 1)), 0)  # [favoured, any other]
    assert loss == pytest.approx(-float(lp[0] + lp[1]) / 2)  # " solution" (another token), then "2" (favoured)


def test_batched_scores_equal_one_row_at_a_time():
    """Right padding changes nothing: the scores of rows of different lengths in one batch are their own."""
    tok = AutoTokenizer.from_pretrained(TINY)
    model = AutoModelForCausalLM.from_pretrained(TINY).eval()
    records = [_record(), {**_record("solution1"), "instruction": "Short?\n\nAnswer format: solution1/solution2"}]
    rows, starts, owner = cs._sequences(records, tok, build_train_prompt, [cs.candidates(r) for r in records])
    assert owner == [0, 0, 1, 1] and len({len(r) for r in rows}) > 1
    together, n = cs.score_candidates(model, rows, starts, tok.eos_token_id, batch_size=4)
    alone = torch.cat([cs.score_candidates(model, [r], [s], tok.eos_token_id)[0] for r, s in zip(rows, starts)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert n.tolist() == [len(r) - s for r, s in zip(rows, starts)]


def test_loss_by_offset_averages_each_response_position_over_rows():
    vocab, fav, other = 8, 3, 5
    lp = torch.log_softmax(torch.tensor([5.0] + [0.0] * (vocab - 1)), 0)
    a, b = -float(lp[0]), -float(lp[1])  # nll of the favoured token, of any other
    ids = torch.tensor([[1, 2, fav, other, 0], [1, other, other, fav, 2]])
    labels = torch.tensor([[-100, -100, fav, other, -100], [-100, other, other, fav, -100]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    got = cs.loss_by_offset(_Prefers(fav, vocab), [batch, {**batch, "labels": torch.full_like(labels, -100)}])
    assert got == pytest.approx([(a + b) / 2, b, a])  # row 0: fav, other; row 1: other, other, fav
