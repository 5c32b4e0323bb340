"""Exclusive locks on a workdir (one training run at a time) and on a dataset build.

Two runs on one workdir would interleave their metrics and overwrite each other's
checkpoints while both reported success; two builds into one data_dir would delete each
other's spill files. The second one is refused, with a message naming the first.

Local paths: `fcntl.flock` on `<dir>/<name>.lock`, which holds the holder's host, pid and
start time for the message. The kernel drops the lock when the holder exits, however it
exits, so a crashed run leaves no stale lock (the file stays; only the flock counts).
flock works on local disks; on network filesystems its semantics vary, so point several
hosts at one gs:// workdir rather than at one NFS folder.

gs:// paths: a lock object created with `if_generation_match=0` (the write fails when it
exists), refreshed every `HEARTBEAT_S` by its holder. An object not refreshed for
`STALE_S` belongs to a run that died without cleaning up, and the next run takes it over,
again generation-matched, so two runs racing for a stale lock cannot both win.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import threading
import time
from typing import Iterator

HEARTBEAT_S = 60.0
STALE_S = 300.0


class LockHeld(RuntimeError):
  """Another process holds the lock; the message names it and what to do."""


def _holder() -> dict:
  return {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  }


def _describe(holder: dict) -> str:
  return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (since {holder.get('since', '?')})"


@contextlib.contextmanager
def exclusive(directory: str, name: str, what: str) -> Iterator[None]:
  """Holds `<directory>/<name>.lock` for the body; raises LockHeld when another process has it.

  `what` names the protected thing in the refusal ("workdir runs/stage1")."""
  if str(directory).startswith("gs://"):
    with _gcs_lock(f"{str(directory).rstrip('/')}/{name}.lock", what):
      yield
    return
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"{name}.lock")
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
      except ValueError:
        holder = {}
      raise LockHeld(f"{what} is in use by another process: {_describe(holder)} holds {path}. Wait for "
                     "it to finish, stop it, or use another folder.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    yield
  finally:
    os.close(fd)  # also releases the flock


@contextlib.contextmanager
def _gcs_lock(url: str, what: str) -> Iterator[None]:
  from google.api_core import exceptions  # the [gcs] extra (google-cloud-storage)
  from google.cloud import storage

  bucket_name, _, blob_name = url.removeprefix("gs://").partition("/")
  blob = storage.Client().bucket(bucket_name).blob(blob_name)
  body = json.dumps(_holder())
  try:
    blob.upload_from_string(body, if_generation_match=0)
  except exceptions.PreconditionFailed:
    blob.reload()
    age = time.time() - blob.updated.timestamp()
    holder = json.loads(blob.download_as_bytes() or b"{}")
    if age < STALE_S:
      raise LockHeld(f"{what} is in use by another process: {_describe(holder)} holds {url} (refreshed "
                     f"{age:.0f}s ago). Wait for it to finish, stop it, or use another folder.") from None
    try:  # stale: its holder died; take it over unless someone else just did
      blob.upload_from_string(body, if_generation_match=blob.generation)
    except exceptions.PreconditionFailed:
      raise LockHeld(f"{what}: another process took over the stale lock {url} first") from None
  stop = threading.Event()

  def heartbeat():
    while not stop.wait(HEARTBEAT_S):
      blob.reload()
      blob.upload_from_string(body, if_generation_match=blob.generation)

  thread = threading.Thread(target=heartbeat, daemon=True, name="mgjax-lock-heartbeat")
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join(timeout=5)
    with contextlib.suppress(exceptions.NotFound):
      blob.delete()
