"""Teacher-forced answer scoring for the quality studies: which of a task's listed answers the model finds likeliest.

Why the studies need it (issue 18, round 4): every commonsense response is ``the correct answer is <label>``, and
the bundled tiny bases never saw the token `` correct`` in pretraining (its log-probability after ``the`` is -22 in
the base, about -6.4 after 800 fine-tuning steps, for LoRA and EffiLoRA alike). Greedy generation therefore writes
``the against ...`` and continues off the training distribution, so generation accuracy measures how a model
recovers from a token it was forced into, not which answer it learned; and the mean response loss (the study's
validation loss) is ~90 % that one token. Scoring the candidates under teacher forcing, the way lm-eval-harness
scores multiple choice, asks the question the study is about.

    score(c) = sum of log p(tokens of c | prompt + response prefix)       c: one answer of "Answer format: a/b/..."
    choice   = argmax_c score(c)                                          (ties: the first listed)

The response prefix is the record's ``output`` with its ``answer`` cut from the end ("the correct answer is ").
Pure PyTorch + a tokenizer; the model is any causal LM called as ``model(input_ids=..., attention_mask=...)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["answer_loss", "candidates", "choice_accuracy", "loss_by_offset", "score_candidates"]

_FORMAT = "Answer format: "


def candidates(record: dict[str, str]) -> list[str]:
    """The answers the instruction lists on its last ``Answer format: a/b/...`` line."""
    head, sep, tail = record["instruction"].rpartition(_FORMAT)
    if not sep:
        raise ValueError(f"record {record['instruction'][:60]!r}... has no '{_FORMAT}' line to take candidates from")
    return tail.strip().split("/")


def _prefix(record: dict[str, str]) -> str:
    output, answer = record["output"], record["answer"]
    if not output.endswith(answer):
        raise ValueError(f"output {output!r} does not end with its answer {answer!r}: no response prefix to score from")
    return output[: len(output) - len(answer)].rstrip()


def _sequences(records: Sequence[dict[str, str]], tokenizer: Any, prompt_of: Any,
               options: list[list[str]]) -> tuple[list[list[int]], list[int], list[int]]:
    """Token ids of prompt + prefix + candidate per (record, candidate), where the candidate starts, and the
    record each row belongs to."""
    rows, starts, owner = [], [], []
    for i, (record, opts) in enumerate(zip(records, options)):
        head = prompt_of(record["instruction"], _prefix(record))
        base = tokenizer(head).input_ids
        for option in opts:
            ids = tokenizer(f"{head} {option}").input_ids
            if ids[: len(base)] != base or len(ids) == len(base):
                raise ValueError(f"candidate {option!r} does not tokenize as a continuation of its prompt")
            rows.append(ids)
            starts.append(len(base))
            owner.append(i)
    return rows, starts, owner


@torch.no_grad()
def score_candidates(model: torch.nn.Module, rows: list[list[int]], starts: list[int], pad_id: int,
                     batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob, token count) of each row's tokens from ``starts[i]`` on, rows right-padded in batches."""
    sums, counts = [], []
    for lo in range(0, len(rows), batch_size):
        chunk, first = rows[lo: lo + batch_size], torch.tensor(starts[lo: lo + batch_size])
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for r, seq in enumerate(chunk):
            ids[r, : len(seq)] = torch.tensor(seq)
        lengths = torch.tensor([len(s) for s in chunk])
        pos = torch.arange(width)
        mask = (pos[None] < lengths[:, None]).long()  # (B, W)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, W-1, V)
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, W-1): log p(token t+1)
        scored = (pos[None, 1:] >= first[:, None]) & (pos[None, 1:] < lengths[:, None])  # (B, W-1)
        sums.append((logp * scored).sum(1))
        counts.append(scored.sum(1))
    return torch.cat(sums), torch.cat(counts)


def _score(model: Any, tokenizer: Any, records: Sequence[dict[str, str]], prompt_of: Any,
           options: list[list[str]], batch_size: int) -> tuple[list[list[float]], list[list[int]]]:
    rows, starts, owner = _sequences(records, tokenizer, prompt_of, options)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums, counts = score_candidates(model, rows, starts, pad, batch_size)
    per: list[list[float]] = [[] for _ in records]
    lens: list[list[int]] = [[] for _ in records]
    for i, s, n in zip(owner, sums.tolist(), counts.tolist()):
        per[i].append(s)
        lens[i].append(n)
    return per, lens


def choice_accuracy(model: Any, tokenizer: Any, dataset_dir: str | Path, tasks: Sequence[str], prompt_of: Any,
                    max_per_task: int | None = None, batch_size: int = 64) -> dict[str, float]:
    """Per task and on average: the share of test records whose likeliest listed answer is the gold one."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for task in tasks:
        records = json.loads((Path(dataset_dir) / task / "test.json").read_text())[:max_per_task]
        options = [candidates(r) for r in records]
        scores, _ = _score(model, tokenizer, records, prompt_of, options, batch_size)
        hits = [opts[max(range(len(opts)), key=s.__getitem__)] == r["answer"]
                for r, opts, s in zip(records, options, scores)]
        out[task] = sum(hits) / len(hits)
    out["average"] = sum(out[t] for t in tasks) / len(tasks)
    model.train(was_training)
    return out


def answer_loss(model: Any, tokenizer: Any, records: Sequence[dict[str, str]], prompt_of: Any,
                batch_size: int = 64) -> float:
    """Mean negative log-likelihood per token of the gold answer after prompt + prefix (teacher-forced): the
    validation loss of what the study is about, without the prefix tokens every method fits alike."""
    was_training = model.training
    model.eval()
    scores, lens = _score(model, tokenizer, records, prompt_of, [[r["answer"]] for r in records], batch_size)
    model.train(was_training)
    return -sum(s[0] for s in scores) / sum(n[0] for n in lens)


@torch.no_grad()
def loss_by_offset(model: Any, batches: Any) -> list[float]:
    """Mean negative log-likelihood of the k-th trained (response) token of each row, k = 0, 1, ...: where a
    response's loss sits (on the tiny bases: almost all of it at k = 1, the unseen token " correct")."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    for batch in batches:
        labels = batch["labels"][:, 1:]  # (B, T-1): the token each position predicts
        trained = labels != -100
        if not trained.any():
            continue
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        nll = -torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, T-1)
        k = (trained.cumsum(1) - 1)[trained]  # offset of each trained token within its row's response
        width = max(len(total), int(k.max()) + 1)
        total = F.pad(total, (0, width - len(total))).index_add_(0, k, nll[trained].double())
        count = F.pad(count, (0, width - len(count))) + torch.bincount(k, minlength=width)
    model.train(was_training)
    return (total / count).tolist()
