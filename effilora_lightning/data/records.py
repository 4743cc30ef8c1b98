"""Reading a data file of records, the one way both DataModules do it: a JSON list or JSON Lines.

Which of the two a file is follows from its content, not its name: a file whose first non-blank character is
``[`` is a JSON list, anything else is read line by line. The file is UTF-8, with or without a byte-order mark.
Every error names the file and, where there is one, the line or record, and says what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

__all__ = ["RecordError", "read_records"]


class RecordError(ValueError):
    """A data file or one of its records is malformed; the message names the file, record and field."""


def _text(path: Path) -> str:
    """The file's text, refusing a directory, a missing file and bytes that are not UTF-8 (naming the line)."""
    if path.is_dir():
        raise RecordError(f"data file {path} is a directory; give the path of a JSON or JSON Lines file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark is dropped, not read as content
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise RecordError(
            f"{path}: line {line} is not UTF-8 ({err.reason} at byte {err.start}); save the file as UTF-8"
        ) from err


def read_records(path: str | Path, on_bad_record: Literal["error", "skip"] = "error"
                 ) -> tuple[list[tuple[int, Any]], int]:
    """Parse a JSON list or JSON Lines file into (record index, record) pairs and the number of skipped lines.

    A JSON list that does not parse is always an error (nothing can be recovered from it); a bad JSON Lines
    line is an error, or skipped and counted with ``on_bad_record="skip"``. The record index of a JSON Lines
    file counts its non-blank lines from 0.
    """
    path = Path(path)
    text = _text(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err
        return list(enumerate(records)), 0
    return _read_json_lines(path, text, on_bad_record)


def _read_json_lines(path: Path, text: str, on_bad_record: str) -> tuple[list[tuple[int, Any]], int]:
    """One JSON value per non-blank line."""
    records, skipped = [], 0
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    for index, (line_no, line) in enumerate(lines):
        try:
            records.append((index, json.loads(line)))
        except json.JSONDecodeError as err:
            if on_bad_record == "error":
                raise RecordError(
                    f"{path}: record {index} (line {line_no}) is not valid JSON ({err.msg}); fix it or pass "
                    "on_bad_record='skip'"
                ) from err
            skipped += 1
    return records, skipped
