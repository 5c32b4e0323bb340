"""A valid source file loses no record, and a bad line or element loses only itself.

llava_json reads what Python's json writes and reads (NaN, Infinity, integers past 64 bits,
a UTF-8 byte-order mark) exactly as json.loads does, through ijson's C parser, which takes
none of them by itself. jsonl readers reject a line that Python's json cannot read (a
number of more than 4300 digits) or that is longer than any record (a gzip bomb), and
read the lines after it.
"""

import gzip
import json
import random
import tracemalloc

from mgjax.data import sources
from mgjax.data.records import Record, Rejection
from mgjax.data.sources import _common


def _read(path, fmt, **kw):
  items = list(sources.read(str(path), format=fmt, source="src", **kw))
  return [r for r in items if isinstance(r, Record)], [r for r in items if isinstance(r, Rejection)]


def _llava(rid, question, **extra):
  return {
      "id": rid,
      "conversations": [{
          "from": "human",
          "value": question
      }, {
          "from": "gpt",
          "value": "An answer."
      }],
      **extra
  }


# Values a record's other fields may hold, and strings that look like what is rewritten
# outside strings: each must come back exactly as json.loads reads it.
_VALUES = [float("nan"), float("inf"), -float("inf"), 2**64, -2**70, 10**300, 1.5e300, -0.0, 7, 1e-7]
_TEXTS = [
    "NaN", "-Infinity", "Infinity", 'say "NaN"', "a \\ backslash", 'quote \\" inside', "12345678901234567890", '\\\\"',
    "ok"
]


def test_llava_json_keeps_every_record_of_a_file_python_wrote(tmp_path):
  rng = random.Random(0)
  # About 300 KB: many of ijson's 64 KB reads, so values and strings fall across their ends.
  rows = [
      _llava(rng.choice([f"r{i}", i, 2**63 + i]), " ".join(rng.choices(_TEXTS, k=rng.randint(1, 6))) + f" {i}",
             score=rng.choice(_VALUES), extra=[rng.choice(_VALUES)
                                               for _ in range(rng.randint(0, 5))])
      for i in range(2000)
  ]
  text = json.dumps(rows)  # allow_nan: NaN and Infinity as Python writes them
  assert "NaN" in text and "Infinity" in text and str(2**64) in text
  path = tmp_path / "mixed.json"
  for data in (text.encode(), b"\xef\xbb\xbf" + text.encode()):  # with and without a UTF-8 BOM
    path.write_bytes(data)
    recs, rejs = _read(path, "llava_json")
    assert not rejs
    expected = json.loads(data.decode("utf-8-sig"))
    assert [r.id for r in recs] == [f"src:{row['id']}" for row in expected]
    assert [r.messages[0]["content"] for r in recs] == [row["conversations"][0]["value"] for row in expected]


def test_llava_json_number_too_long_rejects_its_record_alone(tmp_path):
  path = tmp_path / "long.json"
  path.write_text("[" + json.dumps(_llava("a", "Q1")) + ', {"id": "b", "n": ' + "9" * 5000 +
                  ', "conversations": []}, ' + "1" * 100_000 + ", " + json.dumps(_llava("c", "Q3")) + "]")
  recs, rejs = _read(path, "llava_json")
  assert [r.id for r in recs] == ["src:a", "src:c"]
  assert [(r.record, r.kind) for r in rejs] == [("record 1", "bad_schema"), ("record 2", "bad_schema")]
  assert "more than 4300 digits" in rejs[0].reason


def test_a_utf16_file_is_named_as_utf16(tmp_path):
  path = tmp_path / "utf16.json"
  path.write_text(json.dumps([_llava("a", "Q")]), encoding="utf-16")
  recs, rejs = _read(path, "llava_json")
  assert not recs and [(r.record, r.kind) for r in rejs] == [("whole file", "not_utf8")]
  assert "UTF-16" in rejs[0].reason
  path = tmp_path / "utf16.jsonl"
  path.write_text(json.dumps({"conversations": ["Q", "A"]}) + "\n", encoding="utf-16")
  recs, rejs = _read(path, "lima")
  assert not recs and "UTF-16" in rejs[0].reason and "re-encode it as UTF-8" in rejs[0].reason


def _lima(k):
  return json.dumps({"conversations": [f"Question {k}?", f"Answer {k}."]}).encode() + b"\n"


def test_jsonl_rejects_a_number_python_cannot_read_and_keeps_the_rest(tmp_path):
  path = tmp_path / "digits.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + _lima(1) + b'{"conversations": ["Q", "A"], "n": ' + b"9" * 5000 + b"}\n" +
                   b'{"conversations": ["Q", "A"], "score": NaN, "big": ' + str(2**70).encode() + b"}\n" + _lima(4))
  recs, rejs = _read(path, "lima")
  assert [r.id for r in recs] == ["src:1", "src:3", "src:4"]  # the BOM does not cost line 1
  assert [(r.record, r.kind) for r in rejs] == [("line 2", "invalid_json")]
  assert "4300" in rejs[0].reason


def test_a_gzip_bomb_line_is_rejected_in_bounded_memory(tmp_path):
  path = tmp_path / "bomb.jsonl.gz"
  line_bytes = 4 * _common.MAX_LINE_BYTES
  with gzip.open(path, "wb", compresslevel=1) as f:
    f.write(_lima(1) + b'{"conversations": ["')
    for _ in range(line_bytes >> 20):
      f.write(b"a" * (1 << 20))
    f.write(b'", "A"]}\n' + _lima(3))
  assert path.stat().st_size < line_bytes / 100
  tracemalloc.start()
  try:
    recs, rejs = _read(path, "lima")
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert [r.id for r in recs] == ["src:1", "src:3"]
  assert [(r.record, r.kind) for r in rejs] == [("line 2", "line_too_long")]
  assert "longer than 32 MiB" in rejs[0].reason and str(path) == rejs[0].file
  assert peak < 3 * _common.MAX_LINE_BYTES  # never the whole 128 MiB line
