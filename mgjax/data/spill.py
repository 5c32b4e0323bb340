"""Kept records on disk between cleaning and writing, so a build holds only their small
`Entry`s in memory, never their text and images (hundreds of GB in the full recipe).

Cleaning appends each record that passes the filters to a shard file of its own process
(a pool worker or a Beam worker); the entry it returns says where. Mixing, the data card
and the TFDS writer then work on entries and read records back by offset. A record is
stored as two pickles, text first, so the card and the tokenizer can read the text alone.

The shards live under the data_dir (a gs:// data_dir puts them on GCS, where Dataflow
workers can reach them) and are deleted when the build ends.
"""

from __future__ import annotations

import dataclasses
import pickle
import uuid
from typing import Any, BinaryIO, Iterator

from etils import epath

from mgjax.data.records import Record


@dataclasses.dataclass(frozen=True)
class Entry:
  """A kept record: what mixing and the card need of it, and where the rest is."""
  id: str  # mixing gives upsampled copies their own ids (`<id>#<k>`)
  source: str
  category: str
  origin: str  # "file\twhere", for rejecting it later as a duplicate
  shard: str
  offset: int
  text_nbytes: int
  image_nbytes: int


class Writer:
  """Appends records to one new shard file under `directory`; one writer per process."""

  def __init__(self, directory: str | epath.Path):
    self.path = epath.Path(directory) / f"records-{uuid.uuid4().hex}"
    self._file: BinaryIO | None = None
    self._offset = 0

  def add(self, record: Record) -> Entry:
    if self._file is None:
      self._file = self.path.open("wb")
    text = pickle.dumps((record.id, record.source, record.category, record.messages, record.origin),
                        protocol=pickle.HIGHEST_PROTOCOL)
    images = pickle.dumps(list(record.images), protocol=pickle.HIGHEST_PROTOCOL)
    self._file.write(text)
    self._file.write(images)
    entry = Entry(record.id, record.source, record.category, record.origin, str(self.path), self._offset,
                  len(text), len(images))
    self._offset += len(text) + len(images)
    return entry

  def flush(self) -> None:
    """Makes every entry returned so far readable by other processes."""
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


class Reader:
  """Reads records back by entry, keeping the shard files it has opened open."""

  def __init__(self):
    self._files: dict[str, BinaryIO] = {}

  def _read(self, shard: str, offset: int, nbytes: int) -> bytes:
    f = self._files.get(shard)
    if f is None:
      f = self._files[shard] = epath.Path(shard).open("rb")
    f.seek(offset)
    return f.read(nbytes)

  def record(self, entry: Entry, images: bool = True) -> Record:
    """The record with `entry.id` (a mixing copy's id where it is one); without `images`
    only its text is read."""
    raw = self._read(entry.shard, entry.offset, entry.text_nbytes + (entry.image_nbytes if images else 0))
    _, source, category, messages, origin = pickle.loads(raw[:entry.text_nbytes])
    return Record(id=entry.id, source=source, category=category, messages=messages,
                  images=pickle.loads(raw[entry.text_nbytes:]) if images else [], origin=origin)

  def close(self) -> None:
    for f in self._files.values():
      f.close()
    self._files.clear()


def dump_stream(path: str | epath.Path, items: Iterator[Any]) -> None:
  """Writes items as a sequence of pickles (read back with `load_stream`)."""
  with epath.Path(path).open("wb") as f:
    for item in items:
      pickle.dump(item, f, protocol=pickle.HIGHEST_PROTOCOL)


def load_stream(path: str | epath.Path) -> Iterator[Any]:
  """The items `dump_stream` wrote, one at a time."""
  with epath.Path(path).open("rb") as f:
    while True:
      try:
        yield pickle.load(f)
      except EOFError:
        return
