"""Helpers every reader shares: opening files by path or URL, and turning a candidate
record into either a `Record` or a `Rejection` the same way in every format."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import stat
import warnings
import zlib
from typing import IO, Any, Iterator

from etils import epath
from PIL import Image

from mgjax.data import images, records
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


# Errors a damaged compressed file raises while it is read: not gzip at all (BadGzipFile,
# an OSError), cut short (EOFError), or corrupt inside (zlib.error).
READ_ERRORS = (OSError, EOFError, zlib.error)


def unencodable(text: str) -> int | None:
  """The index of the first character UTF-8 cannot encode (a lone surrogate such as
  "\\ud800", which JSON escapes can spell), or None when the text is fine. Such text
  breaks the tokenizer, the TFDS writer and the spill files."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    return e.start
  return None


def _text_problem(record: Record) -> str | None:
  """Why the record's strings cannot be stored as UTF-8, or None."""
  for name, text in (("id", record.id), *((f"turn {i}", m.get("content")) for i, m in enumerate(record.messages))):
    at = unencodable(text) if isinstance(text, str) else None
    if at is not None:
      return (f"{name}: character {at} is {text[at]!r}, a lone surrogate that UTF-8 cannot encode; fix the "
              "escape (\\ud800-\\udfff must come in high-low pairs) or drop the record")
  return None


def finish(record: Record, file: str, where: str, category: str | None = None) -> Record | Rejection:
  """Sets the category (given or inferred) and validates; a failing record becomes a Rejection."""
  problem = _text_problem(record)
  if problem is not None:
    return Rejection(record.source, file, where, problem, kind="not_utf8")
  record.category = category or records.infer_category(record.messages, len(record.images))
  record.origin = f"{file}\t{where}"
  reason = records.check(record)
  if reason is None:
    return record
  return Rejection(record.source, file, where, reason, kind=check_kind(reason), id=record.id, messages=record.messages)


def load_images(record: Record, file: str, where: str) -> Record | Rejection:
  """Replaces the record's image paths by the files' bytes, each decoded once in full to
  prove it is an image; a missing or undecodable file rejects the record."""
  loaded = []
  for image in record.images:
    problem = not_regular_file(str(image))
    if problem is not None:
      return Rejection(record.source, file, where, f"image {problem}; image paths must name image files",
                       kind="missing_image", id=record.id, messages=record.messages)
    try:
      data = epath.Path(image).read_bytes()
    except FileNotFoundError:
      return Rejection(record.source, file, where, f"image file not found: {image} (check image_root and the "
                       "'image' path)", kind="missing_image", id=record.id, messages=record.messages)
    except OSError as e:
      return Rejection(record.source, file, where, f"cannot read image {image}: {e}", kind="missing_image",
                       id=record.id, messages=record.messages)
    # Its size is checked from the header, before decoding (a few hundred bytes of PNG can
    # decode to gigabytes); then it is decoded in full, not just header-checked: a truncated
    # download passes verify() and would only fail in the middle of training.
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # size_problem says it
        with Image.open(io.BytesIO(data)) as img:
          problem = images.size_problem(*img.size)
          if problem is None:
            img.load()
    except Image.DecompressionBombError as e:  # more than twice PIL's limit: refused by open
      problem = f"is too large to decode ({e}); downscale it"
    except Exception as e:  # PIL raises many types for bad files
      return Rejection(record.source, file, where, f"image {image} cannot be decoded ({type(e).__name__}: {e}); "
                       "re-download or remove it", kind="corrupt_image", id=record.id, messages=record.messages)
    if problem is not None:
      return Rejection(record.source, file, where, f"image {image} {problem}", kind="bad_image_size", id=record.id,
                       messages=record.messages)
    loaded.append(data)
  record.images = loaded
  return record


def not_regular_file(path: str) -> str | None:
  """Why a local path cannot be read as a file (missing, a directory, a FIFO, a device,
  a socket), or None when it is a regular file or remote. Checked without opening it:
  opening a FIFO blocks until something writes to it, which would stall a build forever."""
  if "://" in path:
    return None  # object stores hold only plain objects
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    return None  # the open that follows says so, as for a remote path
  except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
    return f"{path!r} cannot be examined ({e})"
  if stat.S_ISREG(mode):
    return None
  what = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket"
          if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
  return f"{path} is {what}, not a regular file"


@contextlib.contextmanager
def open_binary(path: str) -> Iterator[IO[bytes]]:
  """Opens a local or remote file for reading bytes; `.gz` files are decompressed, since
  publishers ship large exports that way (oasst2's `*.jsonl.gz`).

  Raises:
    ValueError: the path is not a regular file (a directory, a FIFO, ...): a mistake in
      the data config's `path`, so no record of it could be read.
  """
  problem = not_regular_file(str(path))
  if problem is not None:
    raise ValueError(f"source file {problem}; set the source's 'path' to a data file")
  with epath.Path(path).open("rb") as raw:
    if str(path).endswith(".gz"):
      with gzip.open(raw, "rb") as f:
        yield f
    else:
      yield raw


# The longest line a jsonl reader takes. A record is a few KB (an OpenAssistant tree, the
# largest kind, well under 1 MB); lines are read at most this much at a time, so a
# damaged or hostile file (a gzip of a few MB can hold a 2 GB line) costs no more memory.
MAX_LINE_BYTES = 32 << 20


def _lines(f: IO[bytes]) -> Iterator[tuple[bytes, bool]]:
  """The file's lines, each with whether it was cut at MAX_LINE_BYTES (its rest is read
  past in bounded pieces and dropped). A UTF-8 byte-order mark before the first is dropped."""
  first = True
  while True:
    line = f.readline(MAX_LINE_BYTES + 1)
    if first:
      line, first = line.removeprefix(b"\xef\xbb\xbf"), False
    if not line:
      return
    if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
      yield line, False
      continue
    rest = line
    while rest and not rest.endswith(b"\n"):
      rest = f.readline(1 << 20)
    yield line[:64], True


def iter_jsonl(path: str, source: str) -> Iterator[tuple[int, Any] | Rejection]:
  """Yields (line number, parsed object), or a Rejection for a line that is not JSON.

  Lines are numbered from 1 as editors show them; blank lines are skipped silently.
  Undecodable bytes (not UTF-8), JSON nested too deeply to parse, numbers Python does not
  read (more than 4300 digits) and lines longer than MAX_LINE_BYTES reject only their own
  line; a compressed file that is damaged or cut short yields its lines up to the damage,
  then one Rejection for the rest. A UTF-8 byte-order mark is skipped.
  """
  with open_binary(path) as f:
    lineno = 0
    lines = _lines(f)
    while True:
      try:
        raw, cut = next(lines, (None, False))
      except READ_ERRORS as e:
        yield unreadable(source, path, f"after line {lineno}" if lineno else "whole file", e)
        return
      if raw is None:
        return
      lineno += 1
      if lineno == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        yield Rejection(source, str(path), "whole file", "the file is UTF-16 (it starts with a UTF-16 byte-order "
                        "mark); re-encode it as UTF-8", kind="not_utf8")
        return
      if cut:
        yield Rejection(
            source, str(path), f"line {lineno}",
            f"longer than {MAX_LINE_BYTES >> 20} MiB (it starts {raw!r}); no record is that long: the "
            "file is damaged or not jsonl (one JSON object a line)", kind="line_too_long")
        continue
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield Rejection(source, str(path), f"line {lineno}", f"not UTF-8 ({e}); re-encode the file as UTF-8",
                        kind="not_utf8")
        continue
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        yield Rejection(source, str(path), f"line {lineno}", f"invalid JSON: {e.msg} at column {e.colno}",
                        kind="invalid_json")
      except RecursionError:
        yield Rejection(source, str(path), f"line {lineno}",
                        "JSON nested too deeply to parse (about 1000 levels or more); no real record "
                        "is shaped so", kind="invalid_json")
      except ValueError as e:  # a number of more than 4300 digits, Python's limit for reading one
        yield Rejection(source, str(path), f"line {lineno}", f"a value Python's json cannot read ({e}); fix or "
                        "drop the line", kind="invalid_json")


def unreadable(source: str, path: str, where: str, error: BaseException) -> Rejection:
  """The Rejection for the rest of a file that cannot be read on from `where` it broke
  (a damaged or truncated .gz)."""
  kind = "cut short" if isinstance(error, EOFError) else "damaged or not in its format"
  check = " (`gzip -t` tests a .gz)" if str(path).endswith(".gz") else ""
  return Rejection(
      source, str(path), where,
      f"the file cannot be read on, it is {kind} ({type(error).__name__}: {error}); the rest of "
      f"it is lost: download it again{check}", kind="unreadable_file")
