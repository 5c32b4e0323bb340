"""Files written whole or not at all: the bytes go to a temporary name beside the file, which
is then renamed into place. A reader (a rerun, the next stage, a pod worker) sees the old file
or the new one, never half of one, whatever kill or full disk comes between."""

from __future__ import annotations

import os

from etils import epath


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"  # one per process: two writers never share it
  try:
    tmp.write_bytes(data)
    tmp.replace(path)  # os.replace locally: atomic on one filesystem
  finally:
    if tmp.exists():
      tmp.unlink()
