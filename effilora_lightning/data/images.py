"""Images of visual instruction samples: where they may live, checking them at setup, turning them into tensors.

Checks name the sample and the file and say what to do; a failing image raises `BadRecordError`, whose `kind` is
the counter it goes to when the DataModule skips it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

__all__ = ["BadRecordError", "check_image", "check_images", "image_paths", "load_images", "preprocess_image",
           "to_rgb"]

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

    def __reduce__(self) -> tuple[type[BadRecordError], tuple[str, str]]:
        return type(self), (self.kind, str(self))  # (pickled from a build process: the default passes only args)


def check_image(sample_id: str, path: str | os.PathLike[str], decode: bool = True) -> None:
    """The file exists and decodes (`decode=False`: its header parses), else a BadRecordError naming both."""
    if not os.path.isfile(path):
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



def image_paths(record: dict[str, Any], sample_id: str, image_folder: str | os.PathLike[str], allow_outside: bool
                ) -> tuple[str, ...]:
    """The record's images as normalized absolute paths (none for text-only samples), each inside `image_folder`
    unless allowed. The check is on the written path ("../x.png", "/abs.png"), so a folder that links elsewhere
    still works. Strings, not ``Path``s: setup makes one per image of 665k records."""
    image = record.get("image")
    names = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"sample {sample_id!r}: 'image' must be a string or a list of strings, got {image!r}")
    folder, inside = _folder(os.fspath(image_folder))
    paths = tuple(os.path.normpath(os.path.join(folder, n)) for n in names)
    for name, path in zip(names, paths):
        if not allow_outside and path != folder and not path.startswith(inside):
            raise BadRecordError(
                "image_outside_folder",
                f"sample {sample_id!r}: image {name!r} resolves to {path}, outside image_folder {folder}. Fix the "
                "path, set allow_images_outside_folder=True if that is intended, or on_bad_record='skip'.")
    return paths


@functools.lru_cache(maxsize=8)
def _folder(image_folder: str) -> tuple[str, str]:
    """The folder as an absolute normalized path, and the prefix of every path inside it."""
    folder = os.path.abspath(image_folder)
    return folder, folder if folder.endswith(os.sep) else folder + os.sep


def check_images(paths: Iterable[str], decode: bool, known: dict[str, BadRecordError | None]) -> None:
    """Check every path not in ``known`` yet, in parallel threads (PIL decodes without the GIL: 665k images do
    not make a serial wall), and record each outcome in ``known`` (None: fine). Outcomes are per file, not per
    sample: the sample id in a stored error is replaced when it is raised for another sample."""
    todo = [p for p in dict.fromkeys(paths) if p not in known]
    if not todo:
        return

    def outcome(path: str) -> BadRecordError | None:
        try:
            check_image("", path, decode)
        except BadRecordError as err:
            return err
        return None

    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
        known.update(zip(todo, pool.map(outcome, todo)))


def raise_for(sample_id: str, error: BadRecordError) -> None:
    """Raise an image check's stored error for ``sample_id``."""
    raise BadRecordError(error.kind, str(error).replace("sample '':", f"sample {sample_id!r}:", 1))


def load_images(sample_id: str, paths: Sequence[Path], size: int, args: tuple[Any, ...]) -> Tensor:
    """(n, 3, size, size) preprocessed images of one sample (n may be 0), or a BadRecordError naming it."""
    tensors = []
    for path in paths:
        try:
            with Image.open(path) as image:
                tensors.append(preprocess_image(image, *args))
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            raise BadRecordError("unreadable_image", f"sample {sample_id!r}: cannot read image {path}: {err}") from err
    return torch.stack(tensors) if tensors else torch.zeros(0, 3, size, size)
