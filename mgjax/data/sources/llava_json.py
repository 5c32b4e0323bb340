"""Mini-Gemini / LLaVA instruction JSON: one JSON array of
`{"id", "image": str | [str, ...] (absent for text only), "conversations": [{"from", "value"}]}`.

Images are read as encoded bytes (decoding happens in the training pipeline) from paths
resolved under `image_root`; a path that would leave `image_root` is rejected, so a
crafted dataset cannot read arbitrary files from the machine that builds it.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from typing import Any, Iterator

from etils import epath
from PIL import Image

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
              category: str | None) -> Record | Rejection:
  """One LLaVA-shaped record, checked; `where` names its place in the file for rejections."""
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
    try:
      images.append(resolved.read_bytes())
    except FileNotFoundError:
      return reject(f"image file not found: {resolved} (check image_root and the 'image' path)", "missing_image")
    except OSError as e:
      return reject(f"cannot read image {resolved}: {e}", "missing_image")
    # Decoded in full, not just header-checked: a truncated download passes verify() and
    # would only fail in the middle of training.
    try:
      with Image.open(io.BytesIO(images[-1])) as img:
        img.load()
    except Exception as e:  # PIL raises many types for bad files  # pylint: disable=broad-except
      return reject(f"image {resolved} cannot be decoded ({type(e).__name__}: {e}); re-download or remove it",
                    "corrupt_image")
  # LLaVA data with one image sometimes omits the placeholder; its convention is that the
  # image comes first in the first human turn.
  if images and not any(IMAGE_PLACEHOLDER in m["content"] for m in messages):
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is not None and len(images) == 1:
      first_user["content"] = f"{IMAGE_PLACEHOLDER}\n{first_user['content']}"
  record = Record(id=f"{source}:{rid}", source=source, category="",
                  messages=messages, images=images)
  return _common.finish(record, path, where, category)


def read(path: str, *, source: str, image_root: str | None = None, category: str | None = None,
         **options) -> Iterator[Record | Rejection]:
  """Yields one Record per array element, or a Rejection saying why not.

  A file that is not a JSON array cannot be read at all: it becomes one Rejection.
  """
  if options:
    raise ValueError(f"llava_json reader: unknown options {sorted(options)}")
  try:
    with _common.open_binary(path) as f:
      data = json.loads(f.read().decode("utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    yield Rejection(source, str(path), "whole file", f"invalid JSON: {e}", kind="invalid_json")
    return
  if not isinstance(data, list):
    yield Rejection(source, str(path), "whole file",
                    f"expected a JSON array of records, got {type(data).__name__}", kind="bad_schema")
    return
  for index, obj in enumerate(data):
    rid = obj.get("id") if isinstance(obj, dict) else None
    if rid is None and isinstance(obj, dict):
      obj = dict(obj, id=index)  # the position names a record that has no id
    yield to_record(obj, f"record {index} (id={rid})", str(path), source, image_root, category)
