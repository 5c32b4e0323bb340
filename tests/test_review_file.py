"""A review file (review.jsonl, the review page's export) is read exactly, or refused with one
message naming the file and the fix: never a hang, never a bare traceback, no verdict lost."""

import json
import os
import pathlib
import threading

import ml_collections
import pytest

from mgjax.data import verdicts


def _line(rid, source, verdict, note=""):
  # As the page's JSON.stringify writes it: non-ASCII (U+2028 included) left as it is.
  return json.dumps({"id": rid, "source": source, "verdict": verdict, "note": note}, ensure_ascii=False) + "\n"


def _within(seconds, fn):
  """fn's exception (or None) if it returns within `seconds`; fails the test if it hangs."""
  out = {}

  def run():
    try:
      fn()
    except Exception as e:  # noqa: BLE001  (the test looks at which one)
      out["error"] = e
    out["done"] = True

  t = threading.Thread(target=run, daemon=True)
  t.start()
  t.join(seconds)
  assert out.get("done"), f"still running after {seconds} s"
  return out.get("error")


def test_a_fifo_as_the_review_file_is_refused_at_once(tmp_path):
  fifo = tmp_path / "review.jsonl"
  os.mkfifo(fifo)
  error = _within(10, lambda: verdicts.read(str(fifo)))
  assert isinstance(error, ValueError)
  assert str(error) == (f"data config review={str(fifo)!r} is not a regular file (a pipe, socket or device); name "
                        "the review.jsonl the review page exported")
  config = ml_collections.ConfigDict({"review": str(fifo)})
  assert isinstance(_within(10, lambda: verdicts.load(config)), ValueError)


def test_a_directory_as_the_review_file_names_it(tmp_path):
  with pytest.raises(ValueError, match=r"review='.*' is a directory; name the review.jsonl the review page exported"):
    verdicts.read(str(tmp_path))


def test_a_utf16_review_file_names_its_encoding_and_the_fix(tmp_path):
  f = tmp_path / "review.jsonl"
  f.write_text(_line("s:a", "s", "keep"), encoding="utf-16")
  with pytest.raises(
      ValueError, match=r"review.jsonl: the review file is UTF-16 \(it starts with a UTF-16 byte-order "
      r"mark\); save it as UTF-8"):
    verdicts.read(str(f))
  f.write_bytes(b"\xff\x00" + _line("s:a", "s", "keep").encode())
  with pytest.raises(ValueError, match=r"the review file is not UTF-8 \(byte 0\); save it as UTF-8"):
    verdicts.read(str(f))
  # A UTF-8 byte-order mark, as some editors save, is only a mark.
  f.write_bytes(b"\xef\xbb\xbf" + _line("s:a", "s", "keep").encode())
  assert verdicts.read(str(f)) == {("s", "s:a"): verdicts.Verdict("s:a", "s", "keep")}


def test_ids_and_notes_with_unicode_line_separators_read_back_exactly(tmp_path):
  f = tmp_path / "review.jsonl"
  odd_id, odd_note = "s:one\u2028two\u2029three\u0085four", "looks\u2028fine\u0085to me"
  f.write_text(_line(odd_id, "s", "keep", odd_note) + _line("s:plain", "s", "drop"), encoding="utf-8")
  assert "\u2028" in f.read_text(encoding="utf-8")  # written raw, as the page writes it
  assert verdicts.read(str(f)) == {
      ("s", odd_id): verdicts.Verdict(odd_id, "s", "keep", odd_note),
      ("s", "s:plain"): verdicts.Verdict("s:plain", "s", "drop"),
  }


def test_one_id_in_two_sources_keeps_both_verdicts(tmp_path):
  f = tmp_path / "review.jsonl"
  f.write_text(_line("x:1", "first", "keep", "good") + _line("x:1", "second", "drop", "bad"))
  got = verdicts.Verdicts(verdicts.read(str(f)))
  assert got.get("x:1", "first") == verdicts.Verdict("x:1", "first", "keep", "good")
  assert got.get("x:1", "second") == verdicts.Verdict("x:1", "second", "drop", "bad")
  assert got.get("x:1", "third") is None
  # The same id and source marked both ways is still a contradiction to resolve.
  f.write_text(_line("x:1", "first", "keep") + _line("x:1", "first", "drop"))
  with pytest.raises(ValueError, match="line 2: id 'x:1' of source 'first' is marked drop here and keep on line 1"):
    verdicts.read(str(f))


def test_malformed_lines_name_the_file_and_line(tmp_path):
  f = tmp_path / "review.jsonl"
  f.write_text(_line("s:a", "s", "keep") + '{"id": "s:b", "source": "s", "verdict": "drop", "n": ' + "9" * 5000 + "}\n")
  with pytest.raises(ValueError, match=r"review.jsonl: line 2: .*; each line must be"):
    verdicts.read(str(f))
  f.write_text(_line("s:a", "s", "keep") + json.dumps({"id": "s:b", "source": "s", "verdict": "drop", "note": 3}))
  with pytest.raises(ValueError, match="line 2: note must be a string"):
    verdicts.read(str(f))


def test_a_review_file_edited_during_the_build_is_refused(tmp_path):
  f = tmp_path / "review.jsonl"
  f.write_text(_line("s:a", "s", "drop"))
  config = ml_collections.ConfigDict({"review": str(f)})
  applied = verdicts.load(config)
  out = tmp_path / "built"
  out.mkdir()
  verdicts.keep_copy(config, applied, out)
  assert (out / verdicts.COPY).read_bytes() == f.read_bytes()
  f.write_text(_line("s:a", "s", "keep"))
  with pytest.raises(ValueError, match=r"review file .* changed while the build ran; build again"):
    verdicts.keep_copy(config, applied, out)
  assert json.loads((out / verdicts.COPY).read_text())["verdict"] == "drop"  # the copy is what was applied


def test_missing_review_file_says_where_relative_paths_start(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(
      FileNotFoundError, match=r"review='review.jsonl': no such file \(a relative path is taken from "
      f"the current folder, {tmp_path}\\)"):
    verdicts.read("review.jsonl")
  assert not pathlib.Path("review.jsonl").exists()
