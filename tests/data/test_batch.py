"""The batch contract: one pad, one way to tell a generation batch, integer sample ids in both DataModules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from effilora_lightning.data.batch import generation_prompt, is_generation_batch, is_loss_batch, pad, pad_mask


def test_pad_right_keeps_rows_at_the_start_and_fills_the_rest():
    out = pad([torch.tensor([5, 6, 7]), torch.tensor([8])], -1, "right")
    assert out.tolist() == [[5, 6, 7], [8, -1, -1]] and out.dtype == torch.long


def test_pad_left_puts_rows_at_the_end():
    out = pad([[5, 6, 7], np.array([8], np.int32)], 0, "left")
    assert out.tolist() == [[5, 6, 7], [0, 0, 8]] and out.dtype == torch.long


def test_pad_keeps_trailing_dims_dtype_and_values_of_float_rows():
    rows = [torch.full((1, 2), 1.5), torch.full((3, 2), 2.5)]  # (t, D) embeddings
    out = pad(rows, 0.0, "left")
    assert out.shape == (2, 3, 2) and out.dtype == torch.float32
    assert out[0].tolist() == [[0.0, 0.0], [0.0, 0.0], [1.5, 1.5]] and (out[1] == 2.5).all()


def test_pad_mask_marks_the_tokens_on_either_side():
    seqs = [[1, 2, 3], [4]]
    assert pad_mask(seqs, "right").tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pad_mask(seqs, "left").tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_refuses_no_rows_and_an_unknown_side():
    with pytest.raises(ValueError, match="at least one sequence"):
        pad([], 0, "right")
    with pytest.raises(ValueError, match="'left' or 'right', got 'middle'"):
        pad([[1]], 0, "middle")


def test_generation_and_loss_batches_are_told_apart_by_their_keys():
    ids, mask = torch.tensor([[0, 7]]), torch.tensor([[0, 1]])
    loss = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    generation = {"input_ids": ids, "attention_mask": mask, "task": ["boolq"], "answer": ["true"],
                  "sample_id": torch.tensor([3])}
    both = loss | {"prompt_input_ids": ids[:, 1:], "prompt_attention_mask": mask[:, 1:], "task": ["vqa"],
                   "answer": ["red"], "sample_id": torch.tensor([0])}
    assert (is_generation_batch(loss), is_loss_batch(loss)) == (False, True)
    assert (is_generation_batch(generation), is_loss_batch(generation)) == (True, False)
    assert (is_generation_batch(both), is_loss_batch(both)) == (True, True)
    assert generation_prompt(generation)[0] is ids and generation_prompt(generation)[1] is mask
    assert generation_prompt(both)[0].tolist() == [[7]] and generation_prompt(both)[1].tolist() == [[1]]
