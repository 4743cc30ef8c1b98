"""records.RecordStream and records_at: a record read again where the first pass found it is the same record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from effilora_lightning.data.records import RecordError, RecordStream, records_at

# Multi-byte characters (offsets are in characters, not bytes), a raw U+2028 inside a string (a JSON string may
# hold it unescaped; str.splitlines would cut the line there), numbers as records (one may end a chunk).
RECORDS = [{"id": "a", "text": "caf\u00e9 \u2028 line"}, 12345, {"id": "b", "text": "\U0001f600" * 9}, [1, 2],
           {"id": "c", "text": "x"}, 678]


def _json_list(path: Path) -> Path:
    body = ",\n  ".join(json.dumps(r, ensure_ascii=False) for r in RECORDS)
    path.write_text("\ufeff[\n  " + body + " \n]\n", encoding="utf-8")  # with a byte-order mark
    return path


def _json_lines(path: Path) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in RECORDS]
    lines.insert(2, "{not json")  # skipped, still counted in the indices
    lines.insert(4, "   ")  # blank: not a record
    path.write_text("\n".join("  " + line for line in lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("chunk", [3, 16, 1 << 20])
@pytest.mark.parametrize("make", [_json_list, _json_lines])
def test_records_at_reads_back_exactly_the_records_a_stream_yields(tmp_path, make, chunk):
    path = make(tmp_path / "records.json")
    stream = RecordStream(path, "skip", chunk_chars=chunk)
    seen = [(index, record, stream.start) for index, record in stream]
    assert [record for _, record, _ in seen] == RECORDS
    if make is _json_lines:
        assert [index for index, _, _ in seen] == [0, 1, 3, 4, 5, 6] and stream.skipped == 1
    for wanted in (range(6), [0], [5], [1, 3], [2, 3, 4], [0, 5]):
        located = [(seen[k][0], seen[k][2]) for k in wanted]
        got = list(records_at(path, located, chunk_chars=chunk))
        assert got == [(seen[k][0], seen[k][1]) for k in wanted], (wanted, chunk)


def test_a_line_holding_a_raw_line_separator_is_one_record(tmp_path):
    """U+2028 in the first chunk of a JSON Lines file used to split its line in two (and fail to parse)."""
    path = _json_lines(tmp_path / "r.jsonl")
    assert next(iter(RecordStream(path)))[1] == RECORDS[0]


def test_records_at_says_when_the_file_changed_since_the_first_pass(tmp_path):
    path = _json_list(tmp_path / "records.json")
    stream = RecordStream(path)
    located = [(index, stream.start) for index, _ in stream]
    path.write_text('["short"]', encoding="utf-8")
    with pytest.raises(RecordError, match=r"records.json: record 5 is no longer where .* changed"):
        list(records_at(path, located[-1:]))


def test_records_at_refuses_records_out_of_file_order(tmp_path):
    path = _json_list(tmp_path / "records.json")
    stream = RecordStream(path, chunk_chars=8)
    located = [(index, stream.start) for index, _ in stream]
    with pytest.raises(ValueError, match="record 0 .* file order"):
        list(records_at(path, [located[4], located[0]], chunk_chars=8))
