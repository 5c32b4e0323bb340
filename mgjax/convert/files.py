"""Reading and writing the weight files users download: Hugging Face folders and safetensors.

A Hugging Face model folder holds config.json and its weights as safetensors, either one
file (model.safetensors) or shards named by an index (model.safetensors.index.json, whose
"weight_map" maps each tensor to its shard). Other checkpoints (timm, OpenCLIP) may be a
single weights file, which every function here also takes in place of a folder.

Safetensors are read and written here directly (an 8-byte header length, a JSON header
of dtype/shape/offsets, then raw little-endian bytes), through np.memmap: tensors are not
copied into memory until used, and bfloat16 works (the safetensors package's numpy reader
has no bfloat16).

Pickle checkpoints (.bin, .pt, .pth) can run arbitrary code when loaded, so they are
refused unless the caller passes allow_pickle=True; even then they are read with
torch.load(weights_only=True), and only where torch is installed.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

CONFIG_FILE = 'config.json'
SAFETENSORS_INDEX = 'model.safetensors.index.json'
SAFETENSORS_SINGLE = 'model.safetensors'
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth')

# safetensors dtype tags <-> numpy dtypes (bfloat16 and float8 come from ml_dtypes via jnp).
_DTYPES: dict[str, np.dtype] = {
  'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
  'BF16': np.dtype(jnp.bfloat16), 'F8_E4M3': np.dtype(jnp.float8_e4m3fn),
  'F8_E5M2': np.dtype(jnp.float8_e5m2), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
  'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8),
  'BOOL': np.dtype(np.bool_),
}
_TAGS = {dtype: tag for tag, dtype in _DTYPES.items()}


class WeightsError(ValueError):
  """A weights folder or file that is missing, unreadable, or refused."""


def _listing(path: str) -> str:
  try:
    names = sorted(os.listdir(path))
  except OSError:
    return '(cannot list it)'
  shown = ', '.join(names[:20]) + (f', ... ({len(names)} in all)' if len(names) > 20 else '')
  return f'[{shown}]' if names else '(empty)'


def read_config(path: str) -> dict[str, Any]:
  """The config.json of a Hugging Face model folder, as a dict.

  Raises:
    WeightsError: the folder or its config.json is missing or not valid JSON.
  """
  if not os.path.isdir(path):
    raise WeightsError(f'{path} is not a folder: expected a Hugging Face model folder holding '
                       f'{CONFIG_FILE} and its weights (e.g. from `huggingface-cli download`)')
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(file):
    raise WeightsError(f'{path} has no {CONFIG_FILE} (it holds {_listing(path)}); a Hugging Face '
                       'model folder needs it to say which architecture and sizes the weights are')
  try:
    with open(file) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise WeightsError(f'{file} is not valid JSON: {e}') from e


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
    elif not path.endswith('.safetensors'):
      raise WeightsError(f'{path}: not a weights file mgjax reads (.safetensors, or with '
                         f'allow_pickle {", ".join(PICKLE_SUFFIXES)})')
    return [path]
  if not os.path.isdir(path):
    raise WeightsError(f'{path} does not exist')
  names = sorted(os.listdir(path))
  indexes = [n for n in names if n.endswith('.safetensors.index.json')]
  if indexes:
    index = SAFETENSORS_INDEX if SAFETENSORS_INDEX in indexes else indexes[0]
    return _shards(path, index)
  if SAFETENSORS_SINGLE in names:
    return [os.path.join(path, SAFETENSORS_SINGLE)]
  safetensors = [n for n in names if n.endswith('.safetensors')]
  if safetensors:
    return [os.path.join(path, n) for n in safetensors]
  pickle_indexes = [n for n in names if n.endswith(tuple(s + '.index.json' for s in PICKLE_SUFFIXES))]
  pickles = ([os.path.join(path, n) for n in _shard_names(path, pickle_indexes[0])] if pickle_indexes
             else [os.path.join(path, n) for n in names if n.endswith(PICKLE_SUFFIXES)])
  if pickles:
    _check_pickle_allowed(pickles, allow_pickle)
    missing = [p for p in pickles if not os.path.exists(p)]
    if missing:
      raise WeightsError(f'{path}: the index names shard(s) that are missing: {missing}')
    return pickles
  raise WeightsError(f'{path} holds no weights: expected {SAFETENSORS_SINGLE}, or shards with '
                     f'{SAFETENSORS_INDEX}, or other *.safetensors files; it holds {_listing(path)}')


def _shard_names(folder: str, index_name: str) -> list[str]:
  file = os.path.join(folder, index_name)
  try:
    with open(file) as f:
      weight_map = json.load(f)['weight_map']
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise WeightsError(f'{file} is not a weights index (a JSON object with a "weight_map"): {e!r}') from e
  return sorted(set(weight_map.values()))


def _shards(folder: str, index_name: str) -> list[str]:
  shards = [os.path.join(folder, n) for n in _shard_names(folder, index_name)]
  missing = [os.path.basename(s) for s in shards if not os.path.exists(s)]
  if missing:
    raise WeightsError(f'{os.path.join(folder, index_name)} names shard(s) missing from {folder}: '
                       f'{missing} (an interrupted download? fetch them again)')
  return shards


def _check_pickle_allowed(files: list[str], allow_pickle: bool) -> None:
  if not allow_pickle:
    raise WeightsError(
      f'refusing to load pickle checkpoint(s) {files}: unpickling can run arbitrary code. Use a '
      'safetensors copy of the weights (most Hugging Face repos have one), or, if you trust the '
      'file, pass allow_pickle=True (CLI: --allow_pickle); it is then read with '
      'torch.load(weights_only=True), which needs torch installed.')


def read_safetensors_header(file: str) -> tuple[dict[str, dict[str, Any]], int]:
  """({tensor name: {"dtype", "shape", "data_offsets"}}, where the data starts) of one file."""
  with open(file, 'rb') as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise WeightsError(f'{file} is too short to be a safetensors file')
    (size,) = struct.unpack('<Q', raw)
    if size > 100_000_000:
      raise WeightsError(f'{file}: header of {size} bytes; not a safetensors file')
    try:
      header = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise WeightsError(f'{file}: unreadable safetensors header ({e})') from e
  header.pop('__metadata__', None)
  return header, 8 + size


def _iter_safetensors(file: str) -> Iterator[tuple[str, np.ndarray]]:
  header, start = read_safetensors_header(file)
  data = np.memmap(file, dtype=np.uint8, mode='r')
  for name in sorted(header):
    info = header[name]
    if info['dtype'] not in _DTYPES:
      raise WeightsError(f'{file}: tensor {name} has dtype {info["dtype"]}, which mgjax does not read')
    begin, end = info['data_offsets']
    flat = data[start + begin:start + end].view(_DTYPES[info['dtype']])
    yield name, flat.reshape(info['shape'])


def _iter_pickle(file: str) -> Iterator[tuple[str, np.ndarray]]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise WeightsError(f'{file} is a pickle checkpoint and reading one needs torch '
                       '(pip install torch==2.13.0, a CPU wheel); or use a safetensors copy') from e
  state = torch.load(file, map_location='cpu', weights_only=True)
  # timm/OpenCLIP sometimes wrap the weights: {"state_dict": {...}} or {"model": {...}}.
  for wrapper in ('state_dict', 'model'):
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
      raise WeightsError(f'{path}: tensor {name} appears in more than one weights file')
    tensors[name] = array
  return tensors


def write_safetensors(file: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors to one safetensors file (format "pt", which transformers expects)."""
  offset, entries, arrays = 0, {}, []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if array.dtype not in _TAGS:
      raise WeightsError(f'tensor {name}: dtype {array.dtype} has no safetensors tag')
    entries[name] = {'dtype': _TAGS[array.dtype], 'shape': list(array.shape),
                     'data_offsets': [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  header = {'__metadata__': {'format': 'pt', **(metadata or {})}, **entries}
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)  # the data starts 8-byte aligned
  with open(file, 'wb') as f:
    f.write(struct.pack('<Q', len(encoded)))
    f.write(encoded)
    for array in arrays:
      # Raw bytes, no copy; safetensors is little-endian, as every host jax runs on is.
      f.write(array.reshape(-1).view(np.uint8).data)


def write_weights(folder: str, tensors: Mapping[str, np.ndarray], *,
                  max_shard_bytes: int = 5 * 2**30) -> list[str]:
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
    shard = f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
    write_safetensors(os.path.join(folder, shard), {n: tensors[n] for n in names})
    weight_map.update({n: shard for n in names})
    files.append(os.path.join(folder, shard))
  index = os.path.join(folder, SAFETENSORS_INDEX)
  with open(index, 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  return files + [index]
