"""Reading and writing the weight files users download: Hugging Face folders and safetensors.

A Hugging Face model folder holds config.json and its weights as safetensors, either one
file (model.safetensors) or shards named by an index (model.safetensors.index.json, whose
"weight_map" maps each tensor to its shard). Other checkpoints (timm, OpenCLIP) may be a
single weights file, which every function here also takes in place of a folder.

Safetensors are read and written here directly (an 8-byte header length, a JSON header
of dtype/shape/offsets, then raw little-endian bytes), through np.memmap: tensors are not
copied into memory until used (the safetensors package's readers copy every tensor, 90 GB
for Mixtral-8x7B in bfloat16), and bfloat16 works. The header is checked as the
safetensors package checks it before any byte is mapped: every entry's dtype, shape and
offsets must agree and lie inside the file, so a damaged or crafted file fails with the
file and tensor named.

Pickle checkpoints (.bin, .pt, .pth) can run arbitrary code when loaded, so they are
refused unless the caller passes allow_pickle=True; even then they are read with
torch.load(weights_only=True), and only where torch is installed.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

CONFIG_FILE = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")

# safetensors dtype tags <-> numpy dtypes (bfloat16 and float8 come from ml_dtypes via jnp).
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
    "F8_E4M3": np.dtype(jnp.float8_e4m3fn),
    "F8_E5M2": np.dtype(jnp.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_TAGS = {dtype: tag for tag, dtype in _DTYPES.items()}


class WeightsError(ValueError):
  """A weights folder or file that is missing, unreadable, or refused."""


def _listing(path: str) -> str:
  try:
    names = sorted(os.listdir(path))
  except OSError:
    return "(cannot list it)"
  shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
  return f"[{shown}]" if names else "(empty)"


def read_config(path: str) -> dict[str, Any]:
  """The config.json of a Hugging Face model folder, as a dict.

  Raises:
    WeightsError: the folder or its config.json is missing or not valid JSON.
  """
  if not os.path.isdir(path):
    raise WeightsError(f"{path} is not a folder: expected a Hugging Face model folder holding "
                       f"{CONFIG_FILE} and its weights (e.g. from `huggingface-cli download`)")
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(file):
    raise WeightsError(f"{path} has no {CONFIG_FILE} (it holds {_listing(path)}); a Hugging Face "
                       "model folder needs it to say which architecture and sizes the weights are")
  try:
    with open(file) as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
    raise WeightsError(f"{file} is not valid JSON: {e}") from e
  _check_config(file, config)
  return config


# The decoder sizes every config.json mgjax imports must give, as positive integers.
_REQUIRED_INTS = ("num_hidden_layers", "num_attention_heads", "vocab_size", "hidden_size", "intermediate_size")
# Optional sizes: when present (and not null) they must be positive integers too.
_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                  "max_position_embeddings")


def _check_config(file: str, config: Any) -> None:
  """Raises WeightsError naming the key when config.json lacks a decoder size or gives one
  that is not a positive integer (a string "32", a float, a list)."""
  if not isinstance(config, dict):
    raise WeightsError(f'{file} holds a JSON {type(config).__name__}, expected an object '
                       '({"model_type": ..., "num_hidden_layers": ..., ...}); is it the right file?')
  nested = config.get("text_config")
  text, where = (nested, "text_config.") if isinstance(nested, dict) else (config, "")
  for key in _REQUIRED_INTS + _OPTIONAL_INTS:
    if key not in text or (text[key] is None and key in _OPTIONAL_INTS):
      if key in _REQUIRED_INTS:
        raise WeightsError(f"{file}: {where}{key} is missing; a decoder config.json gives it (compare with "
                           "the model's published config.json)")
      continue
    value = text[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise WeightsError(f"{file}: {where}{key} is {value!r} ({type(value).__name__}), expected a positive "
                         "integer; fix it in config.json")


def weight_files(path: str, *, allow_pickle: bool = False) -> list[str]:
  """The weight files of a folder (or the one file `path` names), in reading order.

  A folder's weights are, in order of preference: the shards its safetensors index names,
  model.safetensors, every other *.safetensors file, and only then (with allow_pickle)
  a pickle index, pytorch_model.bin, or other .bin/.pt/.pth files.

  Raises:
    WeightsError: nothing to read, a shard the index names is missing, or only pickle
      files and allow_pickle is False.
  """
  if os.path.isfile(path):
    if path.endswith(PICKLE_SUFFIXES):
      _check_pickle_allowed([path], allow_pickle)
    elif not path.endswith(".safetensors"):
      raise WeightsError(f'{path}: not a weights file mgjax reads (.safetensors, or with '
                         f'allow_pickle {", ".join(PICKLE_SUFFIXES)})')
    return [path]
  if not os.path.isdir(path):
    raise WeightsError(f"{path} does not exist")
  names = sorted(os.listdir(path))
  indexes = [n for n in names if n.endswith(".safetensors.index.json")]
  if indexes:
    index = SAFETENSORS_INDEX if SAFETENSORS_INDEX in indexes else indexes[0]
    return _shards(path, index)
  if SAFETENSORS_SINGLE in names:
    return [os.path.join(path, SAFETENSORS_SINGLE)]
  safetensors = [n for n in names if n.endswith(".safetensors")]
  if safetensors:
    return [os.path.join(path, n) for n in safetensors]
  pickle_indexes = [n for n in names if n.endswith(tuple(s + ".index.json" for s in PICKLE_SUFFIXES))]
  pickles = ([os.path.join(path, n) for n in _shard_names(path, pickle_indexes[0])]
             if pickle_indexes else [os.path.join(path, n) for n in names if n.endswith(PICKLE_SUFFIXES)])
  if pickles:
    _check_pickle_allowed(pickles, allow_pickle)
    missing = [p for p in pickles if not os.path.exists(p)]
    if missing:
      raise WeightsError(f"{path}: the index names shard(s) that are missing: {missing}")
    return pickles
  raise WeightsError(f"{path} holds no weights: expected {SAFETENSORS_SINGLE}, or shards with "
                     f"{SAFETENSORS_INDEX}, or other *.safetensors files; it holds {_listing(path)}")


def _shard_names(folder: str, index_name: str) -> list[str]:
  file = os.path.join(folder, index_name)
  try:
    with open(file) as f:
      weight_map = json.load(f)["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise WeightsError(f'{file} is not a weights index (a JSON object with a "weight_map"): {e!r}') from e
  return sorted(set(weight_map.values()))


def _shards(folder: str, index_name: str) -> list[str]:
  shards = [os.path.join(folder, n) for n in _shard_names(folder, index_name)]
  missing = [os.path.basename(s) for s in shards if not os.path.exists(s)]
  if missing:
    raise WeightsError(f"{os.path.join(folder, index_name)} names shard(s) missing from {folder}: "
                       f"{missing} (an interrupted download? fetch them again)")
  return shards


def _check_pickle_allowed(files: list[str], allow_pickle: bool) -> None:
  if not allow_pickle:
    raise WeightsError(f"refusing to load pickle checkpoint(s) {files}: unpickling can run arbitrary code. Use a "
                       "safetensors copy of the weights (most Hugging Face repos have one), or, if you trust the "
                       "file, pass allow_pickle=True (CLI: --allow_pickle); it is then read with "
                       "torch.load(weights_only=True), which needs torch installed.")


def read_safetensors_header(file: str) -> tuple[dict[str, dict[str, Any]], int]:
  """({tensor name: {"dtype", "shape", "data_offsets"}}, where the data starts) of one file.

  Raises:
    WeightsError: the file is not a safetensors file, or its header is damaged: an entry
      without dtype/shape/data_offsets, an unknown dtype, offsets that disagree with the
      shape, overlap, or run past the end of the file (a truncated download). The message
      names the file and the tensor.
  """
  with open(file, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise WeightsError(f"{file} is too short to be a safetensors file")
    (size,) = struct.unpack("<Q", raw)
    if size > 100_000_000:
      raise WeightsError(f"{file}: header of {size} bytes; not a safetensors file")
    text = f.read(size)
    if len(text) != size:
      raise WeightsError(f"{file}: the header should be {size} bytes but the file ends after {len(text)}; "
                         "the file is truncated: download it again")
    try:
      header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
      raise WeightsError(f"{file}: unreadable safetensors header ({e})") from e
    data_bytes = os.fstat(f.fileno()).st_size - 8 - size
  if not isinstance(header, dict):
    raise WeightsError(f'{file}: the safetensors header is a JSON {type(header).__name__}, expected an object '
                       'of tensor name -> {"dtype", "shape", "data_offsets"}; not a safetensors file')
  header.pop("__metadata__", None)
  _check_entries(file, header, data_bytes)
  return header, 8 + size


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_entries(file: str, header: dict[str, Any], data_bytes: int) -> None:
  """Raises WeightsError for the first header entry the data cannot back as described."""
  spans = []
  for name, info in header.items():
    bad = lambda why, name=name: WeightsError(f"{file}: tensor {name}: {why}")
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
      missing = sorted({"dtype", "shape", "data_offsets"} - set(info)) if isinstance(info, dict) else None
      raise bad(f"header entry lacks {missing}" if missing else
                f'header entry is a JSON {type(info).__name__}, expected {{"dtype", "shape", "data_offsets"}}')
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
      raise bad(f'dtype {dtype!r} is not one mgjax reads ({", ".join(_DTYPES)})')
    if (not isinstance(shape, list) or len(shape) > 32 or not all(_is_int(d) and 0 <= d < 2**62 for d in shape)):
      raise bad(f"shape {shape!r} is not a list of at most 32 sizes, each a non-negative integer below 2**62")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets) or
        not 0 <= offsets[0] <= offsets[1]):
      raise bad(f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - begin != nbytes:
      raise bad(f"shape {shape} of {dtype} needs {nbytes} bytes but data_offsets {offsets} hold {end - begin}; "
                "the header is damaged")
    if end > data_bytes:
      raise bad(f"data_offsets {offsets} end past the file's {data_bytes} bytes of data; the file is "
                "truncated: download it again")
    spans.append((begin, end, name))
  spans.sort()
  for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
    if begin < end:
      raise WeightsError(f"{file}: tensors {first} and {second} overlap in the data (their data_offsets); "
                         "the header is damaged")


def _iter_safetensors(file: str) -> Iterator[tuple[str, np.ndarray]]:
  header, start = read_safetensors_header(file)
  data = np.memmap(file, dtype=np.uint8, mode="r") if start < os.path.getsize(file) else np.zeros(0, np.uint8)
  for name in sorted(header):
    info = header[name]
    begin, end = info["data_offsets"]
    flat = data[start + begin:start + end].view(_DTYPES[info["dtype"]])
    yield name, flat.reshape(info["shape"])


def _iter_pickle(file: str) -> Iterator[tuple[str, np.ndarray]]:
  try:
    import torch
  except ImportError as e:
    raise WeightsError(f"{file} is a pickle checkpoint and reading one needs torch "
                       "(pip install torch==2.13.0, a CPU wheel); or use a safetensors copy") from e
  try:
    state = torch.load(file, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    # torch's message suggests loading without weights_only, which would run the code.
    found = re.search(r"unsupported GLOBAL \S+|Unsupported global: \S+|Unsupported operand \d+", str(e), re.IGNORECASE)
    detail = f" ({found.group(0)})" if found else ""
    raise WeightsError(
        f"refusing {file}: it holds more than tensors{detail}, and building those objects would run code "
        "from the file. Use a safetensors copy of the weights, or convert the file to safetensors on a "
        "machine where running it does no harm") from None
  except Exception as e:  # any error: torch raises many types for damaged files
    raise WeightsError(f'{file}: not a readable torch checkpoint ({type(e).__name__}: '
                       f'{str(e).splitlines()[0] if str(e) else ""}); download it again') from None
  if not isinstance(state, dict):
    raise WeightsError(f"{file}: holds a {type(state).__name__}, expected a dict of tensor name -> tensor")
  # timm/OpenCLIP sometimes wrap the weights: {"state_dict": {...}} or {"model": {...}}.
  for wrapper in ("state_dict", "model"):
    if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
      state = state[wrapper]
  for name in sorted(state):
    tensor = state[name]
    if not isinstance(tensor, torch.Tensor):
      continue
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: go through its bits
      yield name, tensor.view(torch.int16).numpy().view(jnp.bfloat16)
    else:
      yield name, tensor.numpy()


def iter_tensors(path: str, *, allow_pickle: bool = False) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) for every tensor of a folder or weights file, one file after another.

  Safetensors arrays are read-only memory maps in the file's dtype (bfloat16 included);
  copy or cast them before changing them.
  """
  for file in weight_files(path, allow_pickle=allow_pickle):
    yield from (_iter_pickle(file) if file.endswith(PICKLE_SUFFIXES) else _iter_safetensors(file))


def load_tensors(path: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Every tensor of a folder or weights file, by name (see iter_tensors).

  Raises:
    WeightsError: as weight_files, or a tensor name that appears in two files.
  """
  tensors: dict[str, np.ndarray] = {}
  for name, array in iter_tensors(path, allow_pickle=allow_pickle):
    if name in tensors:
      raise WeightsError(f"{path}: tensor {name} appears in more than one weights file")
    tensors[name] = array
  return tensors


def write_safetensors(file: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors to one safetensors file (format "pt", which transformers expects)."""
  offset, entries, arrays = 0, {}, []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if array.dtype not in _TAGS:
      raise WeightsError(f"tensor {name}: dtype {array.dtype} has no safetensors tag")
    entries[name] = {
        "dtype": _TAGS[array.dtype],
        "shape": list(array.shape),
        "data_offsets": [offset, offset + array.nbytes]
    }
    offset += array.nbytes
    arrays.append(array)
  header = {"__metadata__": {"format": "pt", **(metadata or {})}, **entries}
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for array in arrays:
      # Raw bytes, no copy; safetensors is little-endian, as every host jax runs on is.
      f.write(array.reshape(-1).view(np.uint8).data)


def write_weights(folder: str, tensors: Mapping[str, np.ndarray], *, max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes tensors as Hugging Face lays them out: model.safetensors, or above
  max_shard_bytes, model-0000k-of-0000n.safetensors shards with model.safetensors.index.json.

  Returns the files written.
  """
  os.makedirs(folder, exist_ok=True)
  total = sum(np.asarray(t).nbytes for t in tensors.values())
  if total <= max_shard_bytes:
    file = os.path.join(folder, SAFETENSORS_SINGLE)
    write_safetensors(file, tensors)
    return [file]
  shards: list[list[str]] = [[]]
  size = 0
  for name in sorted(tensors):
    nbytes = np.asarray(tensors[name]).nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  files, weight_map = [], {}
  for k, names in enumerate(shards):
    shard = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(os.path.join(folder, shard), {n: tensors[n] for n in names})
    weight_map.update({n: shard for n in names})
    files.append(os.path.join(folder, shard))
  index = os.path.join(folder, SAFETENSORS_INDEX)
  with open(index, "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return files + [index]
