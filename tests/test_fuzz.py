"""Seeded random damage to valid files: the safetensors reader and the record readers either
read them correctly or fail in their documented way, never with another exception, never
hanging.

  safetensors: load_tensors returns the tensors the header describes, or raises WeightsError.
  readers:     every item is a Record that passes records.check and encodes as UTF-8, or
               a Rejection naming the file, a place in it and a reason.
"""

import gzip
import json
import random
import signal
import struct
import time

import numpy as np
import pytest

from mgjax.convert import files
from mgjax.convert.files import WeightsError
from mgjax.data import records, sources
from mgjax.data.records import Record, Rejection

_SECONDS = 3  # per test: each runs mutations until this budget is spent
_SEED = 1234


@pytest.fixture(autouse=True)
def _no_hang():
  """Fails a test that runs 10x past its budget (a hang), instead of blocking the suite."""

  def alarm(*_):
    raise TimeoutError("fuzz case hung")

  previous = signal.signal(signal.SIGALRM, alarm)
  signal.alarm(10 * _SECONDS)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, previous)


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
  """One random damage: flipped bytes, a cut, a duplicated or deleted span, inserted junk."""
  data = bytearray(data)
  kind = rng.randrange(5)
  if kind == 0:
    for _ in range(rng.randint(1, 8)):
      data[rng.randrange(len(data))] = rng.randrange(256)
  elif kind == 1:
    data = data[:rng.randrange(len(data))]
  elif kind == 2:
    i, j = sorted(rng.randrange(len(data)) for _ in range(2))
    data[i:i] = data[i:j]
  elif kind == 3:
    i, j = sorted(rng.randrange(len(data)) for _ in range(2))
    del data[i:j]
  else:
    junk = rng.choice([b"\x00", b"\\ud800", b"[[[[", b"}", b'"', b"\xff\xfe", b"\n", b'{"a":', b"-1", b"1e999"])
    i = rng.randrange(len(data) + 1)
    data[i:i] = junk * rng.randint(1, 50)
  return bytes(data)


# A JSON value of any type, for replacing a field of a valid record.
_ODD_VALUES = [
    None, True, 0, -1, 1.5, 10**30, "", "\ud800", "x" * 1000, [], ["human"], {
        "a": 1
    }, [[[[]]]], {
        "from": "gpt"
    }, "human", "prompter", "assistant", "\x00"
]


def _mutate_json(rng: random.Random, value):
  """The value with one field somewhere inside replaced, removed or given an odd type."""
  if isinstance(value, dict) and value and rng.random() < 0.8:
    key = rng.choice(list(value))
    out = dict(value)
    r = rng.random()
    if r < 0.2:
      del out[key]
    elif r < 0.6:
      out[key] = rng.choice(_ODD_VALUES)
    else:
      out[key] = _mutate_json(rng, value[key])
    return out
  if isinstance(value, list) and value and rng.random() < 0.8:
    out = list(value)
    i = rng.randrange(len(out))
    out[i] = _mutate_json(rng, out[i]) if rng.random() < 0.7 else rng.choice(_ODD_VALUES)
    return out
  return rng.choice(_ODD_VALUES)


# ------------------------------------------------------------------------------ safetensors


def _valid_safetensors(path, rng):
  tensors = {f"t{i}": rng_array(rng) for i in range(rng.randint(1, 4))}
  files.write_safetensors(str(path), tensors)
  return tensors


def rng_array(rng):
  dtype = rng.choice([np.float32, np.int8, np.float16, files._DTYPES["BF16"]])
  shape = tuple(rng.randint(0, 4) for _ in range(rng.randint(0, 3)))
  return np.arange(int(np.prod(shape)), dtype=np.float32).astype(dtype).reshape(shape)


def _header_mutation(rng, data: bytes) -> bytes:
  """The file with its JSON header (not its bytes) changed, the length prefix kept right."""
  (size,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + size])
  mutated = json.dumps(_mutate_json(rng, header)).encode()
  return struct.pack("<Q", len(mutated)) + mutated + data[8 + size:]


def test_safetensors_reader_never_fails_otherwise(tmp_path):
  rng = random.Random(_SEED)
  path = tmp_path / "model.safetensors"
  end, cases, errors = time.time() + _SECONDS, 0, 0
  while time.time() < end:
    _valid_safetensors(path, rng)
    data = path.read_bytes()
    path.write_bytes(_header_mutation(rng, data) if rng.random() < 0.5 else _mutate_bytes(rng, data))
    cases += 1
    try:
      header, _ = files.read_safetensors_header(str(path))
      loaded = files.load_tensors(str(path))
    except WeightsError as e:
      assert str(path) in str(e)
      errors += 1
      continue
    assert set(loaded) == set(header)
    for name, array in loaded.items():
      assert list(array.shape) == header[name]["shape"]
      assert array.dtype == files._DTYPES[header[name]["dtype"]]
      np.array(array)  # every byte it claims is readable
  assert cases > 50 and 0 < errors < cases


# ------------------------------------------------------------------------------ record readers


def _conv(rng, n):
  return [
      rng.choice(["What is this", "Explain it", "Why so", "Tell me more"]) + f" {i}?" if i %
      2 == 0 else rng.choice(["It is a thing.", "Because of that.", "Here is more."]) for i in range(n)
  ]


def _valid_source(fmt, rng) -> bytes:
  if fmt == "lima":
    return "".join(json.dumps({"conversations": _conv(rng, 2 * rng.randint(1, 3))}) + "\n" for _ in range(6)).encode()
  if fmt == "llava_json":
    return json.dumps([{
        "id": f"r{k}",
        "conversations": [{
            "from": "human" if i % 2 == 0 else "gpt",
            "value": t
        } for i, t in enumerate(_conv(rng, 2))]
    } for k in range(6)]).encode()
  if fmt == "messages_jsonl":
    return "".join(
        json.dumps({
            "id": k,
            "messages": [{
                "role": "user" if i % 2 == 0 else "assistant",
                "content": t
            } for i, t in enumerate(_conv(rng, 4))]
        }) + "\n" for k in range(6)).encode()
  if fmt == "oasst_trees":

    def msg(mid, role, depth):
      replies = [
          msg(f"{mid}.{j}", "assistant" if role == "prompter" else "prompter", depth - 1)
          for j in range(rng.randint(1, 2))
      ] if depth else []
      return {
          "message_id": mid,
          "role": role,
          "text": rng.choice(["Hi there?", "Hello, friend."]),
          "lang": "en",
          "rank": rng.randint(0, 2),
          "replies": replies
      }

    return "".join(
        json.dumps({
            "message_tree_id": f"t{k}",
            "prompt": msg(f"m{k}", "prompter", 3)
        }) + "\n" for k in range(4)).encode()
  # oasst_messages: the flat export
  rows = []
  for k in range(4):
    parent = None
    for i in range(4):
      rows.append({
          "message_id": f"m{k}.{i}",
          "parent_id": parent,
          "role": "prompter" if i % 2 == 0 else "assistant",
          "text": f"text {k} {i}",
          "lang": "en",
          "rank": 0
      })
      parent = f"m{k}.{i}"
  rng.shuffle(rows)
  return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _json_mutation(fmt, rng, data: bytes) -> bytes:
  """A field of one record (one line, or one array element) changed."""
  if fmt == "llava_json":
    return json.dumps(_mutate_json(rng, json.loads(data))).encode()
  lines = data.decode().splitlines()
  i = rng.randrange(len(lines))
  lines[i] = json.dumps(_mutate_json(rng, json.loads(lines[i])))
  return ("\n".join(lines) + "\n").encode()


def _check_items(items, path):
  for item in items:
    if isinstance(item, Rejection):
      assert item.file == str(path) and item.record and item.reason and item.kind
    else:
      assert isinstance(item, Record)
      assert records.check(item) is None
      for m in item.messages:
        m["content"].encode("utf-8")
      item.id.encode("utf-8")


@pytest.mark.parametrize("fmt", ["lima", "llava_json", "messages_jsonl", "oasst_trees", "oasst_messages"])
def test_record_readers_never_fail_otherwise(tmp_path, fmt):
  rng = random.Random(f"{_SEED}-{fmt}")
  end, cases = time.time() + _SECONDS / 2, 0
  while time.time() < end:
    data = _valid_source(fmt, rng)
    kind = rng.random()
    data = _json_mutation(fmt, rng, data) if kind < 0.5 else _mutate_bytes(rng, data)
    gz = rng.random() < 0.2
    if gz:
      data = gzip.compress(data)
      if rng.random() < 0.5:
        data = _mutate_bytes(rng, data)
    path = tmp_path / (f"case{cases}.json" + (".gz" if gz else ""))
    path.write_bytes(data)
    _check_items(list(sources.read(str(path), format=fmt, source="fuzz")), path)
    cases += 1
  assert cases > 20
