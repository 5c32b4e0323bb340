"""LIMA: one JSON object a line, `{"conversations": [str, ...], "source": ...}`.

Turns alternate user/assistant starting with the user. A few real rows have an odd
number of turns: the trailing user turn has no answer to learn from and is dropped.
"""

from __future__ import annotations

from typing import Iterator

from mgjax.data.records import Record, Rejection
from mgjax.data.sources import _common


def read(path: str, *, source: str, image_root: str | None = None, category: str | None = None,
         **options) -> Iterator[Record | Rejection]:
  """Yields one Record per line of a LIMA jsonl file, or a Rejection saying why not."""
  del image_root  # LIMA is text only.
  if options:
    raise ValueError(f"lima reader: unknown options {sorted(options)}")
  for item in _common.iter_jsonl(path, source):
    if isinstance(item, Rejection):
      yield item
      continue
    lineno, row = item
    where = f"line {lineno}"
    turns = row.get("conversations") if isinstance(row, dict) else None
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
      yield Rejection(source, str(path), where, 'expected {"conversations": [str, ...]}', kind="bad_schema")
      continue
    if len(turns) % 2:
      turns = turns[:-1]  # unanswered last user turn
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    record = Record(id=f"{source}:{lineno}", source=source, category="", messages=messages)
    yield _common.finish(record, str(path), where, category)
