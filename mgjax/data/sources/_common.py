"""Helpers every reader shares: opening files by path or URL, and turning a candidate
record into either a `Record` or a `Rejection` the same way in every format."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from typing import IO, Any, Iterator

from etils import epath
from PIL import Image

from mgjax.data import records
from mgjax.data.records import Record, Rejection

# Short, stable names for why a record was dropped: the data card counts by these, while
# `Rejection.reason` keeps the detail (which turn, which path, what to fix).
_CHECK_KINDS = (
    ("empty conversation", "empty_conversation"),
    ("unknown role", "bad_role"),
    ("empty", "empty_turn"),
    ("no assistant turn", "no_assistant_turn"),
    ("broken alternation", "bad_alternation"),
    ("placeholders but", "image_count_mismatch"),
    ("unknown category", "bad_category"),
)


def check_kind(reason: str) -> str:
  """Maps a `records.check` message onto its short kind."""
  for needle, kind in _CHECK_KINDS:
    if needle in reason:
      return kind
  return "invalid"


def finish(record: Record, file: str, where: str, category: str | None = None) -> Record | Rejection:
  """Sets the category (given or inferred) and validates; a failing record becomes a Rejection."""
  record.category = category or records.infer_category(record.messages, len(record.images))
  record.origin = f"{file}\t{where}"
  reason = records.check(record)
  if reason is None:
    return record
  return Rejection(record.source, file, where, reason, kind=check_kind(reason))


def load_images(record: Record, file: str, where: str) -> Record | Rejection:
  """Replaces the record's image paths by the files' bytes, each decoded once in full to
  prove it is an image; a missing or undecodable file rejects the record."""
  images = []
  for image in record.images:
    try:
      data = epath.Path(image).read_bytes()
    except FileNotFoundError:
      return Rejection(record.source, file, where, f"image file not found: {image} (check image_root and the "
                       "'image' path)", kind="missing_image")
    except OSError as e:
      return Rejection(record.source, file, where, f"cannot read image {image}: {e}", kind="missing_image")
    # Decoded in full, not just header-checked: a truncated download passes verify() and
    # would only fail in the middle of training.
    try:
      with Image.open(io.BytesIO(data)) as img:
        img.load()
    except Exception as e:  # PIL raises many types for bad files  # pylint: disable=broad-except
      return Rejection(record.source, file, where, f"image {image} cannot be decoded ({type(e).__name__}: {e}); "
                       "re-download or remove it", kind="corrupt_image")
    images.append(data)
  record.images = images
  return record


@contextlib.contextmanager
def open_binary(path: str) -> Iterator[IO[bytes]]:
  """Opens a local or remote file for reading bytes; `.gz` files are decompressed, since
  publishers ship large exports that way (oasst2's `*.jsonl.gz`)."""
  with epath.Path(path).open("rb") as raw:
    if str(path).endswith(".gz"):
      with gzip.open(raw, "rb") as f:
        yield f
    else:
      yield raw


def iter_jsonl(path: str, source: str) -> Iterator[tuple[int, Any] | Rejection]:
  """Yields (line number, parsed object), or a Rejection for a line that is not JSON.

  Lines are numbered from 1 as editors show them; blank lines are skipped silently.
  Undecodable bytes (not UTF-8) reject only their own line.
  """
  with open_binary(path) as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield Rejection(source, str(path), f"line {lineno}",
                        f"not UTF-8 ({e}); re-encode the file as UTF-8", kind="not_utf8")
        continue
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        yield Rejection(source, str(path), f"line {lineno}",
                        f"invalid JSON: {e.msg} at column {e.colno}", kind="invalid_json")
