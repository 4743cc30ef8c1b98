"""Reading a data file of records, the one way both DataModules do it: a JSON list or JSON Lines.

Which of the two a file is follows from its content, not its name: a file whose first non-blank character is
``[`` is a JSON list, anything else is read line by line. The file is UTF-8, with or without a byte-order mark.
Every error names the file and, where there is one, the line or record, and says what to do.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

__all__ = ["RecordError", "RecordStream", "check_data_file", "read_records", "records_at"]


CHUNK_CHARS = 1 << 20
"""Characters of text read at a time. A chunk is held two or three times while the next is appended (up to 4
bytes a character): 16M-character chunks cost the 170k commonsense setup 70 MiB more peak RSS than 1M ones, and
were no faster."""


class RecordError(ValueError):
    """A data file or one of its records is malformed; the message names the file, record and field."""


def check_data_file(path: str | Path) -> Path:
    """``path`` as a Path, refusing a directory and a missing file with a message naming it."""
    path = Path(path)
    if path.is_dir():
        raise RecordError(f"data file {path} is a directory; give the path of a JSON or JSON Lines file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    return path


def _text(path: Path) -> str:
    """The file's text, refusing a directory, a missing file and bytes that are not UTF-8 (naming the line)."""
    raw = check_data_file(path).read_bytes()
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
    stream = RecordStream(path, on_bad_record)
    records = list(stream)
    return records, stream.skipped


class RecordStream:
    """(record index, record) pairs of a JSON list or JSON Lines file, parsed as they are read: memory holds a
    chunk of text and one batch of records, never the whole file (llava_v1_5_mix665k.json is ~1 GB of text and
    several GB as Python objects). ``skipped`` counts the JSON Lines lines dropped with ``on_bad_record='skip'``.
    Errors are those of ``read_records``, with the same line numbers."""

    def __init__(self, path: str | Path, on_bad_record: Literal["error", "skip"] = "error",
                 chunk_chars: int = CHUNK_CHARS) -> None:
        self.path, self.on_bad_record, self.chunk_chars = check_data_file(path), on_bad_record, chunk_chars
        self.skipped = 0
        self.start = 0
        """Where the record just yielded starts: its first character's offset in the file's text (``records_at``
        reads it there again)."""
        self._size, self._consumed = max(1, self.path.stat().st_size), 0

    @property
    def fraction(self) -> float:
        """About how much of the file has been parsed (characters over bytes), for progress lines."""
        return min(1.0, self._consumed / self._size)

    def __iter__(self):
        try:
            with open(self.path, encoding="utf-8-sig") as f:
                head = f.read(self.chunk_chars)
                if head.lstrip().startswith("["):
                    yield from self._json_list(f, head)
                else:
                    yield from self._json_lines(f, head)
        except UnicodeDecodeError:
            _text(self.path)  # raises the error that names the line
            raise

    def _json_lines(self, f, head: str):
        lines = _lines(head + f.readline(), f)  # (the first chunk completed to its last line's end)
        index = 0
        for line_no, line in enumerate(lines, start=1):
            start, self._consumed = self._consumed, self._consumed + len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if self.on_bad_record == "error":
                    raise RecordError(f"{self.path}: record {index} (line {line_no}) is not valid JSON ({err.msg}); "
                                      "fix it or pass on_bad_record='skip'") from err
                self.skipped += 1
            else:
                self.start = start + len(line) - len(line.lstrip(_JSON_SPACE))
                yield index, record
            index += 1

    def _json_list(self, f, buf: str):
        decoder, index, lines_before, column_before, consumed_before = json.JSONDecoder(), 0, 0, 0, 0
        pos = buf.index("[") + 1
        eof = False
        while True:
            while True:  # the next value, or "]"
                pos = _skip_space(buf, pos)
                if pos < len(buf) and buf[pos] == "]":
                    return
                try:
                    record, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:  # (a number at the buffer's end may go on in the next chunk)
                        break
                except json.JSONDecodeError as err:
                    if eof:
                        line, column = lines_before + err.lineno, err.colno + (column_before if err.lineno == 1 else 0)
                        raise RecordError(f"{self.path}: not valid JSON (line {line}, column {column}: "
                                          f"{err.msg})") from err
                # the value is cut by the buffer's end (or may go on past it): read on
                newline = buf.rfind("\n", 0, pos)  # the buffer will start at pos: where is that in its line?
                column_before = pos - newline - 1 if newline >= 0 else column_before + pos
                lines_before += buf.count("\n", 0, pos)
                consumed_before += pos
                more = f.read(self.chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
            self.start, self._consumed = consumed_before + pos, consumed_before + end
            yield index, record
            index += 1
            pos = _skip_space(buf, end)
            while pos >= len(buf) and not eof:  # (the spaces after a record may go on in the next chunk)
                more = f.read(self.chunk_chars)
                eof = not more
                buf += more
                pos = _skip_space(buf, pos)
            if pos < len(buf) and buf[pos] == ",":
                pos += 1
            elif not (pos < len(buf) and buf[pos] == "]"):
                line = lines_before + buf.count("\n", 0, pos) + 1
                raise RecordError(f"{self.path}: not valid JSON (line {line}: expected ',' or ']' after record "
                                  f"{index - 1})")


def records_at(path: str | Path, located: Iterable[tuple[int, int]], chunk_chars: int = CHUNK_CHARS
               ) -> Iterator[tuple[int, Any]]:
    """The (record index, record) pairs at ``located``: (index, ``RecordStream.start``) pairs from an earlier
    pass over the file, in file order. What lies between them is decoded from UTF-8 but not parsed (decoding is
    ~20x faster than parsing), so a slice of a file, or records scattered over it, cost what they hold, not
    what precedes them. Raises naming the record when the file changed since that pass."""
    path, decoder = check_data_file(path), json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f:  # the very text RecordStream read: the offsets are into it
        buf, buf_start, eof = "", 0, False
        for index, offset in located:
            if offset < buf_start:
                raise ValueError(f"records_at: record {index} at {offset} comes before the one read last; "
                                 "give the records in file order")
            while not eof and offset >= buf_start + len(buf):  # skip the text before the record
                buf_start, buf = buf_start + len(buf), f.read(chunk_chars)
                eof = not buf
            pos = offset - buf_start
            while True:
                try:
                    record, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:  # (at the buffer's end a number may go on in the next chunk)
                        break
                except json.JSONDecodeError:
                    if eof:
                        raise RecordError(f"{path}: record {index} is no longer where the first pass over the "
                                          "file found it: the file changed while setup read it; run setup "
                                          "again") from None
                more = f.read(chunk_chars)
                eof = not more
                buf, buf_start, pos = buf[pos:] + more, buf_start + pos, 0
            yield index, record


_JSON_SPACE = " \t\r\n"  # what JSON allows around a value


def _lines(head: str, f: Any) -> Iterator[str]:
    """The lines of ``head`` and then of ``f``, each with its newline: split at "\\n" only, as reading the file
    does (``str.splitlines`` would also split at U+2028 and other characters a JSON string may hold raw)."""
    start = 0
    while (end := head.find("\n", start)) >= 0:
        yield head[start:end + 1]
        start = end + 1
    if start < len(head):
        yield head[start:]
    yield from f


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _JSON_SPACE:
        pos += 1
    return pos
