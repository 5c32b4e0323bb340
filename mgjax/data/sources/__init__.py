"""Readers, one per source format, all with the same signature:

  read(path, *, source, image_root=None, category=None, **options) -> Iterator[Record | Rejection]

A reader never raises on a bad record: it yields a `Rejection` naming the file, the
record and the reason, and goes on with the rest. It raises only for a mistake in the
config itself (an unknown option, a path that is a directory or a FIFO), which would otherwise
reject every record.
"""

from __future__ import annotations

from typing import Callable, Iterator

from mgjax.data.records import Record, Rejection
from mgjax.data.sources import _common, lima, llava_json, messages_jsonl, oasst

Reader = Callable[..., Iterator[Record | Rejection]]

READERS: dict[str, Reader] = {
    "lima": lima.read,
    "oasst_trees": oasst.read,
    "oasst_messages": oasst.read_messages,
    "llava_json": llava_json.read,
    "messages_jsonl": messages_jsonl.read,
}

# Formats whose records can carry images; they take `lazy_images`.
_IMAGE_FORMATS = ("llava_json", "messages_jsonl")


def read(path: str, *, format: str, source: str, image_root: str | None = None, category: str | None = None,
         lazy_images: bool = False, **options) -> Iterator[Record | Rejection]:
  """Reads `path` with the reader registered for `format`.

  Records come with their images' bytes, or with `lazy_images` with the checked paths,
  for `load_images` to read where the work is spread (the builder's worker processes).
  """
  if format not in READERS:
    raise ValueError(f"unknown source format {format!r} for source {source!r}; known: {sorted(READERS)}")
  if format in _IMAGE_FORMATS:
    options["lazy_images"] = lazy_images
  return READERS[format](path, source=source, image_root=image_root, category=category, **options)


def load_images(record: Record) -> Record | Rejection:
  """Reads and checks the images of a record read with `lazy_images`."""
  file, where = record.origin.split("\t", 1)
  return _common.load_images(record, file, where)
