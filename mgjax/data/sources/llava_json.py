"""Mini-Gemini / LLaVA instruction JSON: one JSON array of
`{"id", "image": str | [str, ...] (absent for text only), "conversations": [{"from", "value"}]}`.

The array is parsed as a stream (ijson), one element at a time: Mini-Gemini's
instruction file is 1.8 GB, which `json.load` would hold whole, several times over.
Elements are built here from ijson's plain events, nested at most _MAX_DEPTH deep: a
deeper element is skipped and rejected (ijson's own builders spend time and memory
quadratic in the depth, so 100k nested brackets would exhaust the machine). Escapes of
lone surrogates ("\\ud800" without its pair), which ijson's C parser turns into errors or
silently into "?", reach it as "\\uffff" (a noncharacter, meant for such internal use):
a record holding one is rejected.

Python writes, and its json module reads, more than ijson's C parser takes: NaN, Infinity
and -Infinity, and integers past 64 bits. The parser's input is rewritten so those parse
(see _StandardNumbers) and numbers come as Python's json gives them, so a valid file
loses no record to them. A number of more than 4300 digits (Python's own limit for
reading one) rejects its record alone. A UTF-8 byte-order mark is skipped.

Images are read as encoded bytes (decoding happens in the training pipeline) from paths
resolved under `image_root`; a path that would leave `image_root` is rejected, so a
crafted dataset cannot read arbitrary files from the machine that builds it. With
`lazy_images` the record carries the checked paths and `_common.load_images` reads them
later, in whichever worker process prepares the record.
"""

from __future__ import annotations

from decimal import Decimal
import os
import posixpath
import re
import reprlib
from typing import Any, Iterator

from etils import epath
import ijson

from mgjax.data.records import IMAGE_PLACEHOLDER, Record, Rejection
from mgjax.data.sources import _common

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# A record is 4 levels deep ([{"conversations": [{"from"...}]}]); anything near this is not one.
_MAX_DEPTH = 64
# Values quoted in rejection reasons are abbreviated: a bad field may hold megabytes.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlevel = 3


def _short(value: Any) -> str:
  return _SHORT.repr(value)


# An escaped backslash (to keep escapes' parity), a surrogate pair, or a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}(?:\\u[dD][c-fC-F][0-9a-fA-F]{2})?|"
                               rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}")
# Every byte an escape or a run of backslashes is made of: a chunk is cut after a byte
# outside them, so no escape is split between two chunks.
_ESCAPE_BYTES = frozenset(b"\\uU0123456789abcdefABCDEF")
_LONE_SURROGATE = "\uffff"


def _mark_lone(match: re.Match) -> bytes:
  text = match.group(0)
  return text if text == b"\\\\" or len(text) == 12 else b"\\uffff"


class _MarkLoneSurrogates:
  """A binary file's JSON text with each lone-surrogate escape replaced by \\uffff."""

  def __init__(self, f):
    self._f = f
    self._held = b""  # the tail of the last chunk, which may be the start of an escape

  def read(self, n: int = -1) -> bytes:
    if n == 0:
      return b""
    while True:
      chunk = self._f.read(n if n and n > 0 else 1 << 16)
      data = self._held + chunk
      cut = len(data)
      if chunk:
        while cut and data[cut - 1] in _ESCAPE_BYTES:
          cut -= 1
      self._held = data[cut:]
      out = _SURROGATE_ESCAPE.sub(_mark_lone, data[:cut])
      if out or not chunk:
        return out


# Python's limit on the digits of an int it reads from text (sys.get_int_max_str_digits);
# a longer number rejects its record, as Python's json rejects its line.
_MAX_NUMBER_CHARS = 4300
# Number literals the parser takes in place of what it does not: a NaN, and a number too
# long to read. Told apart from real numbers by their exact digits and exponent, which no
# real data spells. Infinity becomes 1e999999, which reads as inf as it should.
_NAN = b"-0.0e-999999999999999999"
_TOO_LONG = b"0.0e-999999999999999999"
_SENTINELS = {Decimal(_NAN.decode()).as_tuple(): "nan", Decimal(_TOO_LONG.decode()).as_tuple(): "too long"}
# Outside strings: a string's start, a constant the parser does not take, or a number.
_OUTSIDE = re.compile(rb'"|NaN|-?Infinity|-?[0-9][0-9.eE+-]*')
# A string's characters up to its closing quote (or the end of the data, or an escape
# whose second byte has not come yet).
_STRING_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)
_NUMBER_BYTES = frozenset(b"0123456789.eE+-")
# _skim finds runs of number bytes as runs of 1s in the data so translated (a plain
# substring search: the regex module's search for [0-9.eE+-]{n} is 100 times slower).
_NUMBER_RUNS = bytes.maketrans(bytes(range(256)), bytes(b"1"[0] if b in _NUMBER_BYTES else b"0"[0] for b in range(256)))
_TOO_LONG_RUN = b"1" * (_MAX_NUMBER_CHARS + 1)
# Bytes a chunk's tail is held back over: a number's, and backslashes (an escape's start).
_HELD_BYTES = _NUMBER_BYTES | frozenset(b"\\")
# The beginnings of the constants: data that ends in one waits for the next chunk.
_CONSTANT_PREFIXES = tuple(c[:i] for c in (b"NaN", b"-Infinity", b"Infinity") for i in range(1, len(c)))


class _StandardNumbers:
  """A binary file's JSON text as ijson's C parser takes it: a leading UTF-8 BOM dropped,
  NaN, Infinity and -Infinity outside strings replaced by numbers (_NAN, +-1e999999), and
  numbers longer than _MAX_NUMBER_CHARS by _TOO_LONG (the parser fails on ints past 64
  bits without use_float, and on those of more than 4300 digits with a SystemError).

  The input is scanned once, string by string; a number or constant cut by the end of a
  chunk waits for the next, and a number already too long is dropped as it streams."""

  def __init__(self, f):
    self._f = f
    self._held = b""  # the start of a token the next chunk completes
    self._in_string = False
    self._long_number = False  # inside a number already known to be too long
    self._first = True

  def read(self, n: int = -1) -> bytes:
    if n == 0:
      return b""
    while True:
      chunk = self._f.read(n if n and n > 0 else 1 << 16)
      if self._first:
        while chunk and len(chunk) < 3 and (more := self._f.read(3)):
          chunk += more
        self._first = False
        chunk = chunk.removeprefix(b"\xef\xbb\xbf") or self._f.read(n if n and n > 0 else 1 << 16)
        if chunk.startswith((b"\xff\xfe", b"\xfe\xff")):
          raise UnicodeDecodeError("utf-8", chunk[:2], 0, 2, "the file starts with a UTF-16 byte-order mark")
      data = self._held + chunk
      out = self._skim(data) if chunk and not self._long_number else None
      if out is None:
        out = self._scan(data, final=not chunk)
      if out or not chunk:
        return out

  def _skim(self, data: bytes) -> bytes | None:
    """The common case, at C speed: data with nothing to rewrite passes as it is, but for
    a tail that may be the start of something to rewrite (or of an escape), held for the
    next chunk. The string state after it follows from the quotes that no backslash
    escapes. None when there is something to rewrite: _scan then goes token by token."""
    if b"NaN" in data or b"Infinity" in data or _TOO_LONG_RUN in data.translate(_NUMBER_RUNS):
      return None
    cut = len(data)
    tail = next((p for p in _CONSTANT_PREFIXES if data.endswith(p)), b"")
    cut -= len(tail)
    while cut and data[cut - 1] in _HELD_BYTES:
      cut -= 1
    if len(data) - cut > _MAX_NUMBER_CHARS:
      return None
    # A quote is escaped when an odd run of backslashes comes before it: with n[k] the
    # quotes after k or more, those are n[1] - n[2] + n[3] - ...
    escaped, k = 0, 1
    while n := data.count(b"\\" * k + b'"', 0, cut):
      escaped, k = escaped + (n if k % 2 else -n), k + 1
      if k > 64:  # no real text escapes so
        return None
    self._in_string ^= (data.count(b'"', 0, cut) - escaped) % 2 == 1
    self._held = data[cut:]
    return data[:cut]

  def _scan(self, data: bytes, final: bool) -> bytes:
    out, pos, end = [], 0, len(data)
    self._held = b""
    while pos < end:
      if self._long_number:
        stop = pos
        while stop < end and data[stop] in _NUMBER_BYTES:
          stop += 1
        if stop == end and not final:
          return b"".join(out)  # its digits go on into the next chunk: drop these
        out.append(_TOO_LONG)
        self._long_number, pos = False, stop
      elif self._in_string:
        body = _STRING_BODY.match(data, pos).end()
        if body < end and data[body] == ord('"'):
          self._in_string = False
          body += 1
        elif body < end and not final:  # a backslash whose escaped byte comes next
          self._held = data[body:]
        out.append(data[pos:body])
        if self._held:
          break
        pos = body
      else:
        m = _OUTSIDE.search(data, pos)
        if m is None:
          tail = next((p for p in _CONSTANT_PREFIXES if data.endswith(p, pos)), b"") if not final else b""
          out.append(data[pos:end - len(tail)])
          self._held = tail
          break
        out.append(data[pos:m.start()])
        token, pos = m.group(), m.end()
        if token == b'"':
          self._in_string = True
          out.append(token)
        elif token == b"NaN":
          out.append(_NAN)
        elif token.endswith(b"Infinity"):
          out.append(token.replace(b"Infinity", b"1e999999"))
        elif len(token) > _MAX_NUMBER_CHARS:
          self._long_number = True  # its end is looked for above
        elif pos == end and not final:
          self._held = token  # it may go on in the next chunk
        else:
          out.append(token)
    return b"".join(out)


class _Skipped:
  """Stands for an element skipped unbuilt: nested deeper than _MAX_DEPTH, or holding a
  number too long to read."""

  def __init__(self, reason: str):
    self.reason = reason


def _number(value: Any) -> Any:
  """A number as Python's json reads it (floats as float), or _Skipped for one too long."""
  if not isinstance(value, Decimal):
    return value
  sentinel = _SENTINELS.get(value.as_tuple())
  if sentinel == "nan":
    return float("nan")
  if sentinel == "too long":
    return _Skipped(f"holds a number of more than {_MAX_NUMBER_CHARS} digits, which Python does not read; "
                    "a record has no such number: fix or drop it")
  return float(value)


def _elements(events: Iterator[tuple[str, Any]]) -> Iterator[Any]:
  """The elements of a JSON array, built from ijson.basic_parse events that follow its
  start_array; a _Skipped in place of an element nested deeper than _MAX_DEPTH or holding
  a number too long to read. Reads on past the array's end, so trailing garbage raises
  as ijson reports it."""
  stack: list[Any] = []  # the containers being built, outermost first
  keys: list[Any] = []  # the pending key of each map in `stack`
  skipping = 0  # containers still open inside a skipped element
  skipped: _Skipped | None = None  # why

  def attach(value: Any) -> None:
    parent = stack[-1]
    if isinstance(parent, dict):
      parent[keys[-1]] = value
    else:
      parent.append(value)

  for event, value in events:
    if event == "number":
      value = _number(value)
      if isinstance(value, _Skipped) and not skipping:
        if not stack:
          yield value
          continue
        skipping, skipped, stack, keys = len(stack), value, [], []
    if skipping:
      skipping += event in ("start_map", "start_array")
      skipping -= event in ("end_map", "end_array")
      if not skipping:
        yield skipped
    elif event in ("start_map", "start_array"):
      if len(stack) >= _MAX_DEPTH:
        skipped = _Skipped(f"nested more than {_MAX_DEPTH} levels deep; a record is a flat object (id, image, "
                           "conversations)")
        skipping, stack, keys = len(stack) + 1, [], []
        continue
      new = {} if event == "start_map" else []
      if stack:
        attach(new)
      stack.append(new)
      keys.append(None)
    elif event == "map_key":
      keys[-1] = value
    elif event in ("end_map", "end_array"):
      if not stack:  # the end of the top-level array
        for _ in events:
          pass
        return
      done = stack.pop()
      keys.pop()
      if not stack:
        yield done
    elif stack:
      attach(value)
    else:
      yield value


def _resolve_image(image_root: str, rel: str) -> epath.Path | str:
  """Returns the image path under image_root, or a message saying why it is not allowed."""
  if not isinstance(rel, str) or not rel:
    return f"image path must be a non-empty string, got {_short(rel)}"
  norm = posixpath.normpath(rel.replace("\\", "/"))
  if rel.startswith("/") or "://" in rel or norm == ".." or norm.startswith("../"):
    return f"image path {rel!r} escapes image_root {image_root!r}; paths must be relative and stay inside it"
  root = epath.Path(image_root)
  path = root / norm
  if "://" not in image_root:
    # Symlinks may still point outside; local paths can be checked for real.
    real_root, real = os.path.realpath(image_root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
      return f"image path {rel!r} resolves to {real}, outside image_root {image_root!r}"
  return path


def _has_lone_surrogate(obj: Any) -> bool:
  """Whether a string in the record (nested at most _MAX_DEPTH deep) is marked as holding one."""
  todo = [obj]
  while todo:
    value = todo.pop()
    if isinstance(value, str):
      if _LONE_SURROGATE in value:
        return True
    elif isinstance(value, dict):
      todo += value.values()
      todo += value.keys()
    elif isinstance(value, list):
      todo += value
  return False


def to_record(obj: Any, where: str, path: str, source: str, image_root: str | None, category: str | None,
              lazy_images: bool = False) -> Record | Rejection:
  """One LLaVA-shaped record, checked; `where` names its place in the file for rejections.

  Its images are read and decoded here, or with `lazy_images` left as checked paths for
  `_common.load_images`."""
  rid = obj.get("id") if isinstance(obj, dict) else None
  reject = lambda reason, kind: Rejection(source, path, where, reason, kind=kind)
  if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
    return reject('expected {"id", "conversations": [{"from", "value"}, ...]}', "bad_schema")
  if _has_lone_surrogate(obj):
    return reject(
        "holds a lone surrogate escape (\\ud800-\\udfff without its pair; read as U+FFFF), which "
        "UTF-8 cannot encode; fix the escape or drop the record", "not_utf8")
  messages = []
  for t, turn in enumerate(obj["conversations"]):
    speaker = turn.get("from") if isinstance(turn, dict) else None
    role = _ROLES.get(speaker) if isinstance(speaker, str) else None
    if role is None:
      got = speaker if isinstance(turn, dict) else turn
      return reject(f"turn {t}: 'from' is {_short(got)}, expected human or gpt", "bad_role")
    if not isinstance(turn.get("value"), str):
      return reject(f"turn {t}: 'value' must be a string", "bad_schema")
    messages.append({"role": role, "content": turn["value"]})
  image_paths = obj.get("image")
  image_paths = [] if image_paths is None else [image_paths] if isinstance(image_paths, str) else image_paths
  if not isinstance(image_paths, list):
    return reject(f"'image' must be a path or a list of paths, got {type(image_paths).__name__}", "bad_schema")
  images = []
  if image_paths and image_root is None:
    return reject("record has images but the source has no image_root; set image_root in the data config",
                  "missing_image")
  for rel in image_paths:
    if isinstance(rel, str) and ("\x00" in rel or _common.unencodable(rel) is not None):
      return reject(f"image path {_short(rel)} holds a NUL byte or a lone surrogate, which no file name can",
                    "bad_image_path")
    resolved = _resolve_image(image_root, rel)
    if isinstance(resolved, str):
      return reject(resolved, "image_path_escapes_root")
    images.append(resolved)
  # LLaVA data with one image sometimes omits the placeholder; its convention is that the
  # image comes first in the first human turn.
  if images and not any(IMAGE_PLACEHOLDER in m["content"] for m in messages):
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is not None and len(images) == 1:
      first_user["content"] = f"{IMAGE_PLACEHOLDER}\n{first_user['content']}"
  record = Record(id=f"{source}:{rid}", source=source, category="", messages=messages, images=images)
  if not lazy_images:
    record = _common.load_images(record, path, where)
    if isinstance(record, Rejection):
      return record
  return _common.finish(record, path, where, category)


def read(path: str, *, source: str, image_root: str | None = None, category: str | None = None,
         lazy_images: bool = False, **options) -> Iterator[Record | Rejection]:
  """Yields one Record per array element, or a Rejection saying why not.

  A file that is not a JSON array becomes one Rejection; one that breaks off or turns
  invalid part-way yields its records up to there, then one Rejection for the rest.
  """
  if options:
    raise ValueError(f"llava_json reader: unknown options {sorted(options)}")
  with _common.open_binary(path) as f:
    # Without use_float: floats come as Decimal (turned into float by _number), and ints
    # past 64 bits parse.
    events = ijson.basic_parse(_MarkLoneSurrogates(_StandardNumbers(f)), use_float=False)
    index = -1
    try:
      first = next(events, None)
      if first is None or first[0] != "start_array":
        got = "an empty file" if first is None else f"a JSON {first[0].replace('start_', '')}"
        yield Rejection(source, str(path), "whole file", f"expected a JSON array of records, got {got}",
                        kind="bad_schema")
        return
      for index, obj in enumerate(_elements(events)):
        if isinstance(obj, _Skipped):
          yield Rejection(source, str(path), f"record {index}", obj.reason, kind="bad_schema")
          continue
        rid = obj.get("id") if isinstance(obj, dict) else None
        if rid is None and isinstance(obj, dict):
          obj = dict(obj, id=index)  # the position names a record that has no id
        shown = rid if isinstance(rid, (str, int, float)) or rid is None else _short(rid)
        yield to_record(obj, f"record {index} (id={shown})", str(path), source, image_root, category, lazy_images)
    except _common.READ_ERRORS as e:
      yield _common.unreadable(source, path, "whole file" if index < 0 else f"after record {index}", e)
    except UnicodeDecodeError as e:
      yield Rejection(source, str(path), "whole file" if index < 0 else f"after record {index}",
                      f"not UTF-8 ({e}), the rest of the file is unreadable; re-encode the file as UTF-8",
                      kind="not_utf8")
    except ijson.JSONError as e:
      detail = e.args[0].decode("utf-8", "replace") if isinstance(e.args[0], bytes) else str(e)
      where = "whole file" if index < 0 else f"after record {index}"
      yield Rejection(source, str(path), where,
                      f"invalid JSON, the rest of the file is unreadable: {' '.join(detail.split())}",
                      kind="invalid_json")
