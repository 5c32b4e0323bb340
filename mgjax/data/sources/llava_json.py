"""Mini-Gemini / LLaVA instruction JSON: one JSON array of
`{"id", "image": str | [str, ...] (absent for text only), "conversations": [{"from", "value"}]}`.

The array is parsed as a stream (ijson), one element at a time: Mini-Gemini's
instruction file is 1.8 GB, which `json.load` would hold whole, several times over.

Images are read as encoded bytes (decoding happens in the training pipeline) from paths
resolved under `image_root`; a path that would leave `image_root` is rejected, so a
crafted dataset cannot read arbitrary files from the machine that builds it. With
`lazy_images` the record carries the checked paths and `_common.load_images` reads them
later, in whichever worker process prepares the record.
"""

from __future__ import annotations

import itertools
import os
import posixpath
from typing import Any, Iterator

from etils import epath
import ijson

from mgjax.data.records import IMAGE_PLACEHOLDER, Record, Rejection
from mgjax.data.sources import _common

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


def _resolve_image(image_root: str, rel: str) -> epath.Path | str:
  """Returns the image path under image_root, or a message saying why it is not allowed."""
  if not isinstance(rel, str) or not rel:
    return f"image path must be a non-empty string, got {rel!r}"
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


def to_record(obj: Any, where: str, path: str, source: str, image_root: str | None,
              category: str | None, lazy_images: bool = False) -> Record | Rejection:
  """One LLaVA-shaped record, checked; `where` names its place in the file for rejections.

  Its images are read and decoded here, or with `lazy_images` left as checked paths for
  `_common.load_images`."""
  rid = obj.get("id") if isinstance(obj, dict) else None
  reject = lambda reason, kind: Rejection(source, path, where, reason, kind=kind)
  if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
    return reject('expected {"id", "conversations": [{"from", "value"}, ...]}', "bad_schema")
  messages = []
  for t, turn in enumerate(obj["conversations"]):
    role = _ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
    if role is None:
      got = turn.get("from") if isinstance(turn, dict) else turn
      return reject(f"turn {t}: 'from' is {got!r}, expected human or gpt", "bad_role")
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
  record = Record(id=f"{source}:{rid}", source=source, category="",
                  messages=messages, images=images)
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
    events = ijson.parse(f, use_float=True)
    index = -1
    try:
      first = next(events, None)
      if first is None or first[1] != "start_array":
        got = "an empty file" if first is None else f"a JSON {first[1].replace('start_', '')}"
        yield Rejection(source, str(path), "whole file", f"expected a JSON array of records, got {got}",
                        kind="bad_schema")
        return
      for index, obj in enumerate(ijson.items(itertools.chain([first], events), "item")):
        rid = obj.get("id") if isinstance(obj, dict) else None
        if rid is None and isinstance(obj, dict):
          obj = dict(obj, id=index)  # the position names a record that has no id
        yield to_record(obj, f"record {index} (id={rid})", str(path), source, image_root, category, lazy_images)
    except ijson.JSONError as e:
      detail = e.args[0].decode("utf-8", "replace") if isinstance(e.args[0], bytes) else str(e)
      where = "whole file" if index < 0 else f"after record {index}"
      yield Rejection(source, str(path), where,
                      f"invalid JSON, the rest of the file is unreadable: {' '.join(detail.split())}",
                      kind="invalid_json")
