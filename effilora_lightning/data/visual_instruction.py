"""LightningDataModule for LLaVA-1.5 style visual instruction tuning (stage 1 and stage 2 share the schema).

Records are `{"id", "image" (str, a list of str, or absent), "conversations": [...]}` under `data_path`
(a JSON list, or JSON Lines when the file ends in .jsonl), images relative to `image_folder`.

Setup checks every record of every split the run will use (a fit builds the test split too, so a run never
trains to its end and then fails in the test after fit): the conversation (see
`conversation.validate_conversation`), that each image lies inside `image_folder` (unless
`allow_images_outside_folder`), exists and decodes (`image_check="decode"`, every pixel: a PNG whose data
is truncated behind an intact header fails here, not at step 1; `"header"` reads headers only, for sets too
large to decode at setup), and that its ids spell the template text. A bad record is an error naming the
sample id and path, or with `on_bad_record="skip"` it is dropped and counted in `stats[split]`; an image that
fails to load later all the same is then replaced by the next sample, with a warning, instead of ending the
run. Tokenization mismatches are always dropped and counted, and setup fails when their share
exceeds `max_mismatch_ratio`. Setup tokenizes every sample once (exact lengths for length grouping); items
are tokenized again in `__getitem__` (deterministic; storing ids for 665k samples would cost gigabytes).

Preprocessing is given explicitly (`image_size`, `image_mean`, `image_std`, OpenAI CLIP defaults) rather than
read from the vision tower, so the DataModule builds without the model; the VisionLanguageModule should
compare them with `VisionTower.image_size/image_mean/image_std` and fail on a difference.

`max_length` counts text tokens with each image as ONE position (the LLaVA convention); the model adds
num_patches - 1 positions per image when it expands the placeholder. Training samples are truncated on the
right when the images and at least one supervised token survive, else dropped ("too_long"); evaluation
samples must fit whole.

Batches (keys; B samples, N images in the batch, T/P the padded lengths):
    input_ids       LongTensor (B, T)  right-padded with the pad id; IMAGE_TOKEN_INDEX (-200) per image
    labels          LongTensor (B, T)  -100 on padding, system, user turns and images
    attention_mask  LongTensor (B, T)  1 on tokens (image placeholders included), 0 on padding
    images          FloatTensor (N, 3, S, S), normalised; N = image_counts.sum(), may be 0
    image_counts    LongTensor (B,)    images of each sample, in order: sample b owns the next image_counts[b]
    sample_id       list[str] (B)
and in validation/test batches also the generation prompt (everything before the last reply):
    prompt_input_ids       LongTensor (B, P) left-padded with the pad id
    prompt_attention_mask  LongTensor (B, P)
    answer                 list[str] (B), the last gpt reply
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .conversation import (
    IGNORE_INDEX,
    ConversationTemplate,
    MismatchCounter,
    check_template,
    encode_conversation,
    encode_conversations,
    encode_prompt,
    get_template,
    reference_turns,
    validate_conversation,
)
from .records import RecordError, read_records
from .sampling import ResumableSampler, checked_position, require_training_batches, resume_sampler, training_position
from .tokenizer import load_tokenizer

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "BadRecordError",
    "ModalityLengthGroupedSampler",
    "VisualInstructionCollator",
    "VisualInstructionDataModule",
    "VisualInstructionDataset",
    "preprocess_image",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CHUNK = 1024  # records tokenized per tokenizer call in setup


# ------------------------------------------------------------------------------------------------- images


def preprocess_image(
    image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float], mode: Literal["pad", "resize"]
) -> Tensor:
    """RGB image -> normalised (3, size, size) float tensor.

    pad: pad to a centred square with the mean colour (LLaVA-1.5, keeps the aspect ratio), then resize;
    resize: resize straight to size x size (squash, nothing cropped).
    """
    image = to_rgb(image)
    if mode == "pad":
        image = _pad_to_square(image, tuple(round(255 * m) for m in mean))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)  # (H, W, C)
    pixels = pixels.permute(2, 0, 1).float() / 255.0  # (C, H, W)
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit integer images (PNG "I;16", or "I" holding 0..65535) are scaled to 8 bits: PIL's
    convert("RGB") clips them at 255 instead, and a 16-bit photo comes out white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.convert("I").point(lambda v: v / 257).convert("L")  # 65535 / 257 = 255
    return image.convert("RGB")


def _pad_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Centre the image on a square canvas of its longer side, filled with `fill`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class BadRecordError(ValueError):
    """A record that cannot be used; `kind` is the counter it goes to when skipped."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _check_image(sample_id: str, path: Path, decode: bool = True) -> None:
    """The file exists and decodes (`decode=False`: its header parses), else a BadRecordError naming both."""
    if not path.is_file():
        raise BadRecordError(
            "missing_image",
            f"sample {sample_id!r}: image not found: {path}. Check image_folder, or set on_bad_record='skip'.",
        )
    try:
        with Image.open(path) as image:
            image.load() if decode else image.size  # noqa: B018  (size: the header only)
    except Image.DecompressionBombError as err:
        raise BadRecordError(
            "unreadable_image", f"sample {sample_id!r}: image {path} is larger than PIL accepts ({err}). Resize it, "
            "raise PIL.Image.MAX_IMAGE_PIXELS if it is trusted, or set on_bad_record='skip'.") from err
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as err:
        raise BadRecordError(
            "unreadable_image", f"sample {sample_id!r}: cannot read image {path}: {err}. Set on_bad_record='skip'."
        ) from err


# ------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class _Sample:
    sample_id: str
    images: tuple[Path, ...]
    conversations: list[dict[str, str]]
    length: int  # tokens after truncation, one per image


def _read_records(path: str, on_bad_record: str) -> list[Any]:
    """The file's records (`records.read_records`: JSON list or JSON Lines, UTF-8 with or without a BOM); a
    JSON Lines line that does not parse is an error or, with on_bad_record='skip', dropped with a warning."""
    records, skipped = read_records(path, on_bad_record)
    if skipped:
        rank_zero_warn(f"{path}: skipped {skipped} lines that are not valid JSON (on_bad_record='skip')")
    return [record for _, record in records]


def _image_paths(record: dict[str, Any], sample_id: str, image_folder: Path, allow_outside: bool
                 ) -> tuple[Path, ...]:
    """The record's images as paths (none for text-only samples), each inside `image_folder` unless allowed.
    The check is on the written path ("../x.png", "/abs.png"), so a folder that links elsewhere still works."""
    image = record.get("image")
    names = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"sample {sample_id!r}: 'image' must be a string or a list of strings, got {image!r}")
    folder = os.path.abspath(image_folder)
    paths = tuple(Path(os.path.normpath(os.path.join(folder, n))) for n in names)
    for name, path in zip(names, paths):
        if not allow_outside and os.path.commonpath([folder, path]) != folder:
            raise BadRecordError(
                "image_outside_folder",
                f"sample {sample_id!r}: image {name!r} resolves to {path}, outside image_folder {folder}. Fix the "
                "path, set allow_images_outside_folder=True if that is intended, or on_bad_record='skip'.")
    return paths


# ------------------------------------------------------------------------------------------------ dataset


class VisualInstructionDataset(Dataset):
    """Checked samples -> token ids, labels and preprocessed images; `generation=True` adds the prompt."""

    def __init__(self, samples: list[_Sample], tokenizer: Any, template: ConversationTemplate, image_size: int,
                 image_mean: Sequence[float], image_std: Sequence[float], image_mode: Literal["pad", "resize"],
                 max_length: int, generation: bool = False, skip_bad_images: bool = False) -> None:
        self.samples = samples
        self.skip_bad_images = skip_bad_images
        self.tokenizer = tokenizer
        self.template = template
        self.image_args = (image_size, tuple(image_mean), tuple(image_std), image_mode)
        self.max_length = max_length
        self.generation = generation

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        return [s.length for s in self.samples]

    @property
    def has_image(self) -> list[bool]:
        return [bool(s.images) for s in self.samples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample's item; with `skip_bad_images`, an image that no longer loads (it did at setup) gives the
        next sample's item instead, with a warning, rather than ending the run."""
        for attempt in range(len(self.samples)):
            sample = self.samples[(index + attempt) % len(self.samples)]
            try:
                return self._item(sample, self._load_images(sample))
            except BadRecordError as err:
                if not self.skip_bad_images:
                    raise
                warnings.warn(f"{err}; using the next sample instead (on_bad_record='skip')", stacklevel=2)
        raise RuntimeError("no sample of this split has loadable images any more")

    def _item(self, sample: _Sample, images: Tensor) -> dict[str, Any]:
        n_images = len(sample.images)
        encoded = encode_conversation(sample.conversations, self.template, self.tokenizer, num_images=n_images,
                                      sample_id=sample.sample_id, check=False)
        item = {
            "input_ids": torch.tensor(encoded.input_ids[: self.max_length]),
            "labels": torch.tensor(encoded.labels[: self.max_length]),
            "images": images,
            "sample_id": sample.sample_id,
        }
        if self.generation:
            prompt, answer = encode_prompt(sample.conversations, self.template, self.tokenizer,
                                           num_images=n_images, sample_id=sample.sample_id)
            item |= {"prompt_input_ids": torch.tensor(prompt), "answer": answer}
        return item

    def _load_images(self, sample: _Sample) -> Tensor:
        size = self.image_args[0]
        tensors = []
        for path in sample.images:
            try:
                with Image.open(path) as image:
                    tensors.append(preprocess_image(image, *self.image_args))
            except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
                raise BadRecordError("unreadable_image", f"sample {sample.sample_id!r}: cannot read image {path}: "
                                     f"{err}") from err
        return torch.stack(tensors) if tensors else torch.zeros(0, 3, size, size)  # (n, 3, S, S)


# ---------------------------------------------------------------------------------------------- collation


def _pad(seqs: list[Tensor], value: int, left: bool = False) -> Tensor:
    """Stack 1-D tensors into (B, max_len), padding on the right (or left) with `value`."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for row, seq in enumerate(seqs):
        if left:
            out[row, width - len(seq):] = seq
        else:
            out[row, : len(seq)] = seq
    return out


@dataclass
class VisualInstructionCollator:
    """Items -> a batch (module docstring); text-only and image samples mix freely."""

    pad_token_id: int
    image_size: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [it["input_ids"] for it in items]
        batch = {
            "input_ids": _pad(ids, self.pad_token_id),
            "labels": _pad([it["labels"] for it in items], IGNORE_INDEX),
            "attention_mask": _pad([torch.ones_like(i) for i in ids], 0),
            "images": torch.cat([it["images"] for it in items])
            if items else torch.zeros(0, 3, self.image_size, self.image_size),  # (N, 3, S, S)
            "image_counts": torch.tensor([len(it["images"]) for it in items], dtype=torch.long),
            "sample_id": [it["sample_id"] for it in items],
        }
        if "prompt_input_ids" in items[0]:
            prompts = [it["prompt_input_ids"] for it in items]
            batch["prompt_input_ids"] = _pad(prompts, self.pad_token_id, left=True)
            batch["prompt_attention_mask"] = _pad([torch.ones_like(p) for p in prompts], 0, left=True)
            batch["answer"] = [it["answer"] for it in items]
        return batch


# ------------------------------------------------------------------------------------------------ sampler


class ModalityLengthGroupedSampler(ResumableSampler):
    """Seeded order in which every window of `batch_size * num_replicas` indices is one modality (all with
    images or all text-only) and sorted by length, so each rank's batch is homogeneous and little padded.

    Windows are cut from a per-modality shuffle and then shuffled; the two partial windows go last. The
    sampler shards itself: rank r takes positions r, r + R, ... of the (padded) order, so batch b of every
    rank lies inside window b. Being a DistributedSampler (via `ResumableSampler`), Lightning keeps it under
    DDP instead of wrapping it. The order depends only on (seed, epoch): iterating twice in an epoch gives the
    same indices, Lightning's `set_epoch` moves to the next order, and `resume_at` skips consumed samples.
    Only the last (at most two) batches of a rank can mix modalities: the partial windows and the padding.
    """

    def __init__(self, lengths: Sequence[int], has_image: Sequence[bool], batch_size: int,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        if len(lengths) != len(has_image):
            raise ValueError(f"lengths ({len(lengths)}) and has_image ({len(has_image)}) differ in length")
        if batch_size < 1 or num_replicas < 1:
            raise ValueError(f"batch_size and num_replicas must be >= 1, got {batch_size} and {num_replicas}")
        # DistributedSampler only takes len() of its dataset: the indices stand in for it
        super().__init__(range(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths, self.has_image = list(lengths), list(has_image)
        self.window = batch_size * num_replicas

    def global_order(self) -> list[int]:
        """Every index once, for all ranks together: full one-modality windows (longest first) in a seeded
        shuffle, then the partial windows. Depends on (seed, epoch) only."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        full, partial = [], []
        for modality in (True, False):
            idx = [i for i, m in enumerate(self.has_image) if m == modality]
            rng.shuffle(idx)
            for window in (idx[k: k + self.window] for k in range(0, len(idx), self.window)):
                window.sort(key=lambda i: -self.lengths[i])
                (full if len(window) == self.window else partial).append(window)
        rng.shuffle(full)
        return [i for window in full + partial for i in window]

    def rank_indices(self) -> list[int]:
        """This rank's positions of the global order, padded like DistributedSampler (repeating its start)
        so that every rank gets `num_samples` indices."""
        order = self.global_order()
        if not order:
            return []
        while len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        return order[self.rank: self.total_size: self.num_replicas]


# --------------------------------------------------------------------------------------------- datamodule


class VisualInstructionDataModule(pl.LightningDataModule):
    """LLaVA-1.5 visual instruction data (module docstring: checks, batch format, preprocessing choice).

    Args:
        data_path: training records (a JSON list, or JSON Lines; UTF-8).
        image_folder: root the records' "image" paths are relative to.
        allow_images_outside_folder: accept image paths that lead out of `image_folder` ("../x.png", "/x.png").
        image_check: "decode" (every image fully decoded at setup) or "header" (headers only: faster on huge
            sets; an image that then fails to load is an error, or with on_bad_record="skip" replaced).
        tokenizer_path: local tokenizer directory (loaded by `load_tokenizer`, no download).
        template: "vicuna_v1" (LLaVA-1.5) or "llama3" (LLaMA-3 chat).
        image_size, image_mean, image_std: preprocessing; must match the vision tower.
        image_mode: "pad" (square with the mean colour, then resize) or "resize".
        max_length: token budget per sample, each image counted as one position.
        val_data_path / val_set_size: a validation file, or that many records split off the training file.
        test_data_path: test records; without it `test` uses the validation set.
        batch_size / eval_batch_size: per-device batch sizes for training and validation/test.
        on_bad_record: "error" stops at the first bad record; "skip" drops and counts it.
        max_mismatch_ratio: largest share of tokenization mismatches tolerated per split.
        group_by_modality_length: training order from `ModalityLengthGroupedSampler`, else a seeded shuffle
            (`ResumableSampler`); either resumes mid-epoch from a checkpoint (`state_dict`).
        seed: shuffling and the validation split.
        pad_token: explicit pad token for `load_tokenizer` (None: its default choice).
        system_prompt: replaces the template's system prompt ("" drops the system block; None keeps it).
    """

    def __init__(
        self,
        data_path: str,
        image_folder: str,
        tokenizer_path: str,
        template: Literal["vicuna_v1", "llama3"] = "llama3",
        image_size: int = 336,
        image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        image_std: tuple[float, float, float] = OPENAI_CLIP_STD,
        image_mode: Literal["pad", "resize"] = "pad",
        max_length: int = 2048,
        val_data_path: str | None = None,
        val_set_size: int = 0,
        test_data_path: str | None = None,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        on_bad_record: Literal["error", "skip"] = "error",
        max_mismatch_ratio: float = 0.001,
        group_by_modality_length: bool = True,
        seed: int = 42,
        pad_token: str | None = None,
        system_prompt: str | None = None,
        allow_images_outside_folder: bool = False,
        image_check: Literal["decode", "header"] = "decode",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_args(self.hparams)
        self.template = get_template(template)
        if system_prompt is not None:
            self.template = replace(self.template, system=system_prompt)
        self.tokenizer: Any = None
        self.datasets: dict[str, VisualInstructionDataset] = {}
        self.stats: dict[str, Counter[str]] = {}
        self.mismatches: dict[str, MismatchCounter] = {}
        self._resume: dict[str, int] | None = None  # from a checkpoint: epoch and batches already consumed

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and build (once) the splits the stage needs, checking every record."""
        hp = self.hparams
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(hp.tokenizer_path, pad_token=hp.pad_token)
            check_template(self.template, self.tokenizer)
        # a fit builds the test split too: the CLI tests after fit, and a bad test record must stop the run
        # before training, not after it
        wanted = {"fit": ("train", "val", "test"), "validate": ("val",), "test": ("test",)}.get(stage or "", ())
        missing = [split for split in wanted or ("train", "val", "test") if split not in self.datasets]
        raw = self._raw_splits() if missing else {}
        for split in missing:
            if split == "test" and "val" in self.datasets and raw.get("test") is raw.get("val"):
                self.datasets["test"], self.stats["test"] = self.datasets["val"], self.stats["val"]  # same records
            elif split in raw:
                self._build(split, *raw[split])

    def _raw_splits(self) -> dict[str, tuple[list[dict[str, Any]], str]]:
        """Records of every split with the file they came from; the validation split is seeded."""
        hp = self.hparams
        splits = {"train": (_read_records(hp.data_path, hp.on_bad_record), hp.data_path)}
        if hp.val_set_size:
            records = splits["train"][0]
            order = list(range(len(records)))
            random.Random(hp.seed).shuffle(order)
            held = set(order[: hp.val_set_size])
            splits["val"] = ([records[i] for i in sorted(held)], hp.data_path)
            splits["train"] = ([r for i, r in enumerate(records) if i not in held], hp.data_path)
        elif hp.val_data_path:
            splits["val"] = (_read_records(hp.val_data_path, hp.on_bad_record), hp.val_data_path)
        test_path = hp.test_data_path
        if test_path:
            splits["test"] = (_read_records(test_path, hp.on_bad_record), test_path)
        elif "val" in splits:
            splits["test"] = splits["val"]
        return splits

    def _build(self, split: str, records: list[dict[str, Any]], path: str) -> None:
        """Check the split's records and keep the usable ones (errors or counts, see module docstring)."""
        stats, counter = Counter(total=len(records)), MismatchCounter(split=split)
        generation, samples = split != "train", []
        for start in range(0, len(records), _CHUNK):
            checked = [self._check_record(r, start + i, path, stats)
                       for i, r in enumerate(records[start: start + _CHUNK])]
            samples += self._encode_checked([c for c in checked if c is not None], generation, stats, counter)
        counter.raise_if_above(self.hparams.max_mismatch_ratio)
        if not samples and split == "train":
            raise RecordError(f"{path}: no training sample is left after the checks ({dict(stats)}, "
                              f"{counter.mismatched} tokenization mismatches). Fix the records, raise max_length, "
                              "or check image_folder.")
        if generation:
            _require_unique_ids(samples, path)
        stats["kept"], stats["mismatch"] = len(samples), counter.mismatched
        self.stats[split], self.mismatches[split] = stats, counter
        hp = self.hparams
        self.datasets[split] = VisualInstructionDataset(samples, self.tokenizer, self.template, hp.image_size,
                                                        hp.image_mean, hp.image_std, hp.image_mode, hp.max_length,
                                                        generation=generation,
                                                        skip_bad_images=hp.on_bad_record == "skip")
        rank_zero_info(f"visual instruction {split} ({path}): {dict(stats)}")

    def _check_record(self, record: dict[str, Any], index: int, path: str, stats: Counter[str]) -> _Sample | None:
        """Conversation structure and image files of one record: a sample (length unknown yet), None when
        skipped (counted), or an error naming the sample id (and the image path)."""
        hp = self.hparams
        sample_id = str(record.get("id", f"{Path(path).name}#{index}")) if isinstance(record, dict) \
            else f"{Path(path).name}#{index}"
        try:
            if not isinstance(record, dict):
                raise BadRecordError("bad_record", f"sample {sample_id!r}: record {index} is a "
                                     f"{type(record).__name__}, expected an object with 'conversations'")
            images = _image_paths(record, sample_id, Path(hp.image_folder), hp.allow_images_outside_folder)
            conversations, dropped = reference_turns(record.get("conversations"))
            validate_conversation(sample_id, conversations, len(images))
            for image in images:
                _check_image(sample_id, image, decode=hp.image_check == "decode")
        except ValueError as err:
            if hp.on_bad_record == "error":
                raise err if isinstance(err, BadRecordError) else ValueError(f"{path}: {err}") from err
            stats[getattr(err, "kind", "bad_conversation")] += 1
            return None
        stats["leading_gpt_dropped"] += dropped  # LLaVA's preprocess drops that turn and trains on the rest
        return _Sample(sample_id, images, conversations, 0)

    def _encode_checked(self, samples: list[_Sample], generation: bool, stats: Counter[str],
                        counter: MismatchCounter) -> list[_Sample]:
        """Tokenize checked samples in one batch; drop (and count) mismatches and samples that cannot fit."""
        encoded = encode_conversations([s.conversations for s in samples], self.template, self.tokenizer,
                                       num_images=[len(s.images) for s in samples],
                                       sample_ids=[s.sample_id for s in samples])
        kept = []
        for sample, enc in zip(samples, encoded, strict=True):
            counter.add(sample.sample_id, enc.mismatch)
            if enc.mismatch is not None:
                continue
            length = _fitted_length(enc.input_ids, enc.labels, self.hparams.max_length, whole=generation)
            if length is None:
                stats["too_long"] += 1
                continue
            kept.append(replace(sample, length=length))
        return kept

    def train_dataloader(self) -> DataLoader:
        """Training batches whose order depends only on (seed, epoch) and resumes mid-epoch from a checkpoint.

        Both samplers are DistributedSamplers that shard per rank, so Lightning uses them as they are.
        """
        data, hp = self.datasets["train"], self.hparams
        require_training_batches(self.trainer)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler: ResumableSampler
        if hp.group_by_modality_length:
            sampler = ModalityLengthGroupedSampler(data.lengths, data.has_image, hp.batch_size, world, rank, hp.seed)
        else:
            sampler = ResumableSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=hp.seed)
        if self._resume is not None:  # once: a reloaded loader starts whole
            resume_sampler(sampler, self._resume, hp.batch_size)
            self._resume = None
        return self._loader(data, hp.batch_size, sampler)

    def state_dict(self) -> dict[str, int]:
        """Where training stands in its epoch, so that a run resumed from this checkpoint continues the same
        data order; empty outside of fitting."""
        return training_position(self.trainer, self.hparams.batch_size)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Remember the checkpoint's position; the next `train_dataloader` skips what it had consumed."""
        self._resume = checked_position(state_dict, type(self).__name__)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._split("val"), self.hparams.eval_batch_size, None)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._split("test"), self.hparams.eval_batch_size, None)

    def _split(self, split: str) -> VisualInstructionDataset:
        if split not in self.datasets:
            raise RuntimeError(f"no {split} data: set val_data_path or val_set_size (test: also test_data_path)")
        return self.datasets[split]

    def _loader(self, data: VisualInstructionDataset, batch_size: int, sampler: Sampler | None) -> DataLoader:
        hp = self.hparams
        collate = VisualInstructionCollator(self.tokenizer.pad_token_id, hp.image_size)
        return DataLoader(data, batch_size=batch_size, sampler=sampler, shuffle=False, collate_fn=collate,
                          num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)


def _fitted_length(input_ids: list[int], labels: list[int], max_length: int, whole: bool) -> int | None:
    """Length after right truncation, or None when it would cut an image or every supervised token (or
    anything at all when `whole`)."""
    if len(input_ids) <= max_length:
        return len(input_ids)
    cut_ids, cut_labels = input_ids[max_length:], labels[:max_length]
    if whole or any(i < 0 for i in cut_ids) or all(lab == IGNORE_INDEX for lab in cut_labels):
        return None
    return max_length


def _require_unique_ids(samples: list[_Sample], path: str) -> None:
    """Evaluation dedupes by sample id across ranks, so ids must be unique."""
    counts = Counter(s.sample_id for s in samples)
    duplicates = [sid for sid, n in counts.items() if n > 1]
    if duplicates:
        raise ValueError(f"{path}: evaluation sample ids must be unique; repeated: {duplicates[:5]}")


def _check_args(hp: Any) -> None:
    """Fail at construction on arguments that cannot work (files are checked in setup)."""
    get_template(hp.template)
    problems = []
    if hp.image_mode not in ("pad", "resize"):
        problems.append(f"image_mode must be 'pad' or 'resize', got {hp.image_mode!r}")
    if hp.on_bad_record not in ("error", "skip"):
        problems.append(f"on_bad_record must be 'error' or 'skip', got {hp.on_bad_record!r}")
    if hp.image_check not in ("decode", "header"):
        problems.append(f"image_check must be 'decode' or 'header', got {hp.image_check!r}")
    if not 0.0 <= hp.max_mismatch_ratio <= 1.0 or math.isnan(hp.max_mismatch_ratio):
        problems.append(f"max_mismatch_ratio must be in [0, 1], got {hp.max_mismatch_ratio}")
    if hp.val_data_path and hp.val_set_size:
        problems.append("give val_data_path or val_set_size, not both")
    if min(hp.image_size, hp.max_length, hp.batch_size, hp.eval_batch_size) < 1 or hp.val_set_size < 0:
        problems.append("image_size, max_length, batch_size and eval_batch_size must be >= 1, val_set_size >= 0")
    if len(hp.image_mean) != 3 or len(hp.image_std) != 3 or min(hp.image_std) <= 0:
        problems.append(f"image_mean/image_std need 3 values, std > 0; got {hp.image_mean}, {hp.image_std}")
    if problems:
        raise ValueError("VisualInstructionDataModule: " + "; ".join(problems))
