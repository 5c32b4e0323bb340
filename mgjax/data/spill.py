"""Kept records on disk between cleaning and writing, so a build holds only their small
`Entry`s in memory, never their text and images (hundreds of GB in the full recipe).

Cleaning appends each record that passes the filters to a shard file of its own process
(a pool worker or a Beam worker); the entry it returns says where. Mixing, the data card
and the TFDS writer then work on entries and read records back by offset. A record is
stored as two msgpack values, text first, so the card and the tokenizer can read the text
alone. msgpack, not pickle: reading a file back only ever builds plain values (and the few
types below), so a file planted in a shared data_dir cannot run code in the build.

The shards live under the data_dir (a gs:// data_dir puts them on GCS, where Dataflow
workers can reach them) and are deleted when the build ends.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, BinaryIO, Iterator

from etils import epath
import msgpack
import numpy as np

from mgjax.data import dedup
from mgjax.data.records import Record, Rejection


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
  # The filter kind a review's keep verdict overrode to keep this record (mgjax.data.verdicts).
  overrode: str | None = None


class Writer:
  """Appends records to one new shard file under `directory`; one writer per process."""

  def __init__(self, directory: str | epath.Path):
    self.path = epath.Path(directory) / f"records-{uuid.uuid4().hex}"
    self._file: BinaryIO | None = None
    self._offset = 0

  def add(self, record: Record) -> Entry:
    if self._file is None:
      self._file = self.path.open("wb")
    text = _pack([record.id, record.source, record.category, record.messages, record.origin])
    images = _pack(list(record.images))
    self._file.write(text)
    self._file.write(images)
    entry = Entry(record.id, record.source, record.category, record.origin, str(self.path), self._offset, len(text),
                  len(images))
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
    _, source, category, messages, origin = _unpack(raw[:entry.text_nbytes])
    return Record(id=entry.id, source=source, category=category, messages=messages,
                  images=_unpack(raw[entry.text_nbytes:]) if images else [], origin=origin)

  def close(self) -> None:
    for f in self._files.values():
      f.close()
    self._files.clear()


# msgpack extension codes for the values besides plain ones that builds store.
_TUPLE, _ENTRY, _REJECTION, _SIGNATURE = 1, 2, 3, 4
# Lone surrogates (a record id may spell one in JSON escapes) round-trip rather than fail.
_TEXT_ERRORS = "surrogatepass"


def _encode(value: Any) -> Any:
  """The msgpack form of what `_pack` (strict about types, to keep tuples apart from
  lists) does not pack itself: tuples and the build's dataclasses as extensions, and
  subclasses of plain types as those types."""
  for plain in (bool, int, float, str, bytes, list, dict):
    if isinstance(value, plain) and not isinstance(value, tuple):
      return plain(value)
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, tuple):
    return msgpack.ExtType(_TUPLE, _pack(list(value)))
  if isinstance(value, Entry):
    return msgpack.ExtType(_ENTRY, _pack(list(dataclasses.astuple(value))))
  if isinstance(value, Rejection):
    return msgpack.ExtType(_REJECTION, _pack(list(dataclasses.astuple(value))))
  if isinstance(value, dedup.Signature):
    minhash = None if value.minhash is None else np.asarray(value.minhash, np.uint32).tobytes()
    return msgpack.ExtType(_SIGNATURE, _pack([value.exact, minhash]))
  raise TypeError(f"spill files store plain values, tuples, Entry, Rejection and Signature, not "
                  f"{type(value).__name__}")


def _decode(code: int, data: bytes) -> Any:
  if code == _TUPLE:
    return tuple(_unpack(data))
  if code == _ENTRY:
    return Entry(*_unpack(data))
  if code == _REJECTION:
    return Rejection(*_unpack(data))
  if code == _SIGNATURE:
    exact, minhash = _unpack(data)
    return dedup.Signature(exact, None if minhash is None else np.frombuffer(minhash, np.uint32).copy())
  raise ValueError(f"spill file holds an unknown value type (msgpack extension {code}); it was not written "
                   "by this version of mgjax: delete the spill folder and build again")


def _pack(value: Any) -> bytes:
  return msgpack.packb(value, default=_encode, use_bin_type=True, strict_types=True, unicode_errors=_TEXT_ERRORS)


def _unpack(data: bytes) -> Any:
  return msgpack.unpackb(data, ext_hook=_decode, raw=False, strict_map_key=False, unicode_errors=_TEXT_ERRORS)


def dump_stream(path: str | epath.Path, items: Iterator[Any]) -> None:
  """Writes items as a sequence of msgpack values (read back with `load_stream`)."""
  with epath.Path(path).open("wb") as f:
    for item in items:
      f.write(_pack(item))


def load_stream(path: str | epath.Path) -> Iterator[Any]:
  """The items `dump_stream` wrote, one at a time."""
  with epath.Path(path).open("rb") as f:
    yield from msgpack.Unpacker(f, ext_hook=_decode, raw=False, strict_map_key=False, unicode_errors=_TEXT_ERRORS,
                                max_buffer_size=1 << 30)
