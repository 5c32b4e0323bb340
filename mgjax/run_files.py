"""What a workdir holds besides its checkpoints: the run's tokenizer and the model config it fixes.

The trainer saves the tokenizer into WORKDIR/tokenizer at start-up, so decoding, prediction and
export need nothing but the workdir; `resolve_model_config` fills in what the tokenizer decides
(the <image> token's id) the same way for all of them.
"""

from __future__ import annotations

import errno
import os
import tempfile

import ml_collections
import transformers
from etils import epath


class NotWritable(PermissionError):
  """A run that must write its workdir cannot."""


def not_writable(error: OSError, workdir: str) -> NotWritable | None:
  """`error` as NotWritable when it says the workdir (or a file in it) cannot be written: a
  read-only mount, missing permissions. None for any other error."""
  if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or "://" in str(workdir):
    return None
  root = os.path.abspath(workdir)
  where = os.path.abspath(error.filename) if error.filename else ""
  if not (where == root or where.startswith(root + os.sep) or root.startswith(where + os.sep)):
    return None
  return NotWritable(f"workdir {workdir} cannot be written ({os.strerror(error.errno)}: {error.filename}). An "
                     "unfinished run writes its checkpoints, metrics and report there: make it writable, or copy it "
                     "to a writable place and pass that as --workdir (a finished run only reads it: its summary "
                     "needs no write access).")


def resolve_model_config(model_cfg: ml_collections.ConfigDict, tokenizer) -> ml_collections.ConfigDict:
  """Fills in what the tokenizer decides: the <image> token id; checks the vocabulary fits."""
  model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  if len(tokenizer) > model_cfg.vocab_size:
    raise ValueError(f"tokenizer {tokenizer.name_or_path} has {len(tokenizer)} tokens but model.vocab_size is "
                     f"{model_cfg.vocab_size}; raise --config.model.vocab_size (a multiple of 128 shards best)")
  model_cfg.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
  return model_cfg


def save_tokenizer(tokenizer, workdir: str) -> None:
  """Copies the tokenizer into WORKDIR/tokenizer: a workdir is all predict and export need."""
  target = epath.Path(workdir) / "tokenizer"
  target.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as local:  # save_pretrained writes local files only
    tokenizer.save_pretrained(local)
    for f in epath.Path(local).iterdir():
      (target / f.name).write_bytes(f.read_bytes())


def load_tokenizer(directory: epath.Path):
  """The tokenizer a run saved in `directory` (WORKDIR/tokenizer), local or gs://."""
  if not (directory / "tokenizer_config.json").exists():
    raise FileNotFoundError(f"{directory} holds no tokenizer: `python -m mgjax.main` saves one in every workdir "
                            "it trains; is this the workdir of a run?")
  if "://" not in str(directory):
    return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
  with tempfile.TemporaryDirectory() as local:  # from_pretrained reads local files only
    for f in directory.iterdir():
      (epath.Path(local) / f.name).write_bytes(f.read_bytes())
    return transformers.AutoTokenizer.from_pretrained(local, local_files_only=True)
