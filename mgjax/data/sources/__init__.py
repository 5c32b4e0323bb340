"""Readers, one per source format, all with the same signature:

  read(path, *, source, image_root=None, category=None, **options) -> Iterator[Record | Rejection]

A reader never raises on a bad record: it yields a `Rejection` naming the file, the
record and the reason, and goes on with the rest. It raises only for a mistake in the
config itself (an unknown option), which would otherwise reject every record.
"""

from __future__ import annotations

from typing import Callable, Iterator

from mgjax.data.records import Record, Rejection
from mgjax.data.sources import lima, llava_json, messages_jsonl, oasst

Reader = Callable[..., Iterator[Record | Rejection]]

READERS: dict[str, Reader] = {
    "lima": lima.read,
    "oasst_trees": oasst.read,
    "oasst_messages": oasst.read_messages,
    "llava_json": llava_json.read,
    "messages_jsonl": messages_jsonl.read,
}


def read(path: str, *, format: str, source: str, image_root: str | None = None,
         category: str | None = None, **options) -> Iterator[Record | Rejection]:
  """Reads `path` with the reader registered for `format`."""
  if format not in READERS:
    raise ValueError(f"unknown source format {format!r} for source {source!r}; known: {sorted(READERS)}")
  return READERS[format](path, source=source, image_root=image_root, category=category, **options)
