"""Chat-style jsonl: one `{"messages": [{"role", "content"}, ...], "images": [path, ...]}` a line.

The shape most chat datasets and fine-tuning tools write. `images` (optional) are paths
under `image_root`, one per `<image>` in the turns; an optional `id` names the record.
"""

from __future__ import annotations

from typing import Iterator

from mgjax.data.records import ROLES, Record, Rejection
from mgjax.data.sources import _common, llava_json


def read(path: str, *, source: str, image_root: str | None = None, category: str | None = None,
         lazy_images: bool = False, **options) -> Iterator[Record | Rejection]:
  """Yields one Record per line, or a Rejection saying why not."""
  if options:
    raise ValueError(f"messages_jsonl reader: unknown options {sorted(options)}")
  for item in _common.iter_jsonl(path, source):
    if isinstance(item, Rejection):
      yield item
      continue
    lineno, row = item
    rid = row.get("id") if isinstance(row, dict) else None
    where = f"line {lineno}" + (f" (id={rid})" if rid is not None else "")
    reject = lambda reason, kind, where=where: Rejection(source, str(path), where, reason, kind=kind)
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
      yield reject('expected {"messages": [{"role", "content"}, ...], "images": [...]}', "bad_schema")
      continue
    bad = next((i for i, m in enumerate(messages) if m.get("role") not in ROLES), None)
    if bad is not None:
      yield reject(f"turn {bad}: unknown role {messages[bad].get('role')!r} (expected one of {ROLES})", "bad_role")
      continue
    # The LLaVA reader's image checks (inside image_root, present, decodable) apply as is;
    # it takes the same conversation in its own shape.
    conversations = [{"from": m["role"], "value": m.get("content")} for m in messages]
    images = row.get("images") or None
    obj = {"id": rid if rid is not None else lineno, "conversations": conversations, "image": images}
    yield llava_json.to_record(obj, where, str(path), source, image_root, category, lazy_images)
