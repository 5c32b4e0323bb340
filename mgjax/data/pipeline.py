"""From a built TFDS split to fixed-shape training batches, with grain.

Templates, tokenisation, loss masks and image preprocessing happen here, never in the
builder, so one built dataset serves every model and chat template.

A batch (per process) is a dict of numpy arrays:
  input_ids [B, T] int32       tokens fed to the model; each <image> already expanded
                               into `num_image_tokens` copies of the image token
  targets [B, T] int32         the next token at every position
  loss_mask [B, T] float32     1 where the target is an assistant token
  segment_ids [B, T] int32     1 on real tokens, 0 on padding
  positions [B, T] int32
  images_lowres [B, M, l, l, 3] float32, images_highres [B, M, h, h, 3] float32
                               normalised pixels of up to M images, zeros in empty slots;
                               with model.image_grid g >= 2 images_lowres is
                               [B, M, V, l, l, 3], V = g^2 (+1 with model.image_global)
                               low-res views per image (data.images.mgm_views)
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from mgjax.data import images
from mgjax.data.records import IMAGE_PLACEHOLDER


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def preprocess_image(data: bytes, size: int, mean: tuple, std: tuple) -> np.ndarray:
  """Decodes and preprocesses as transformers' CLIPImageProcessor at `size` (see data.images)."""
  return images.clip_preprocess(images.decode(data), size, mean, std)


class ConversationEncoder:
  """One TFDS example -> one fixed-shape training example (a grain map transform)."""

  def __init__(self, tokenizer, *, seq_len: int, num_image_tokens: int, max_images: int, lowres_size: int,
               highres_size: int, image_mean: tuple, image_std: tuple, pad_to_square: bool = False, image_grid: int = 1,
               image_global: bool = False, truncation: str = "truncate"):
    self.tokenizer = tokenizer
    if truncation not in TRUNCATION:
      raise ValueError(f"data.truncation={truncation!r}: one of {TRUNCATION}")
    # What a conversation longer than seq_len becomes (data.truncation): "truncate" cuts it
    # after its last whole assistant turn that fits (mid-turn only when not even the first
    # fits), "drop" leaves it out (the encoder returns None), "error" stops the run.
    self.truncation = truncation
    # Mini-Gemini's HD layout (model.image_grid / image_global): several low-res views per image.
    self.image_grid, self.image_global = int(image_grid), bool(image_global)
    if self.image_grid < 1 or (self.image_global and self.image_grid < 2):
      raise ValueError(f"image_grid={image_grid}, image_global={image_global}: the grid must be >= 1, "
                       f"and >= 2 for a global view")
    self.pad_to_square = pad_to_square
    self.seq_len = seq_len
    self.num_image_tokens = num_image_tokens
    self.max_images = max_images
    self.lowres_size, self.highres_size = lowres_size, highres_size
    self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
    self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
      raise ValueError(
          f"tokenizer {tokenizer.name_or_path} has no {IMAGE_PLACEHOLDER} token; add it as a special token")
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

  @property
  def lowres_shape(self) -> tuple[int, ...]:
    """One image's low-res input: [l, l, 3], or [V, l, l, 3] with image_grid >= 2."""
    size = (self.lowres_size, self.lowres_size, 3)
    if self.image_grid == 1:
      return size
    return (self.image_grid**2 + int(self.image_global), *size)

  def messages(self, example: dict) -> list[dict[str, str]]:
    m = example["messages"]
    return [{"role": _text(r), "content": _text(c)} for r, c in zip(m["role"], m["content"])]

  def __call__(self, example: dict) -> dict[str, np.ndarray] | None:
    """One example as one fixed-shape row (padded to seq_len and max_images); None when
    data.truncation is "drop" and it is longer than seq_len."""
    out = self.unpadded(example)
    if out is None:
      return None
    n, k = len(out["input_ids"]), len(out["images_lowres"])
    row = {
        "input_ids": np.full(self.seq_len, self.pad_id, np.int32),
        "targets": np.full(self.seq_len, self.pad_id, np.int32),
        "loss_mask": np.zeros(self.seq_len, np.float32),
        "segment_ids": np.zeros(self.seq_len, np.int32),
        "positions": np.zeros(self.seq_len, np.int32),
        "images_lowres": np.zeros((self.max_images, *out["images_lowres"].shape[1:]), np.float32),
        "images_highres": np.zeros((self.max_images, *out["images_highres"].shape[1:]), np.float32),
    }
    for key in ("input_ids", "targets", "loss_mask"):
      row[key][:n] = out[key]
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n)
    row["images_lowres"][:k] = out["images_lowres"]
    row["images_highres"][:k] = out["images_highres"]
    return row

  def _encode(self, example: dict) -> tuple[np.ndarray, np.ndarray]:
    """The whole conversation's ids (images expanded) and assistant mask, uncut."""
    encoded = self.tokenizer.apply_chat_template(self.messages(example), tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
    return self._expand_images(encoded["input_ids"], encoded["assistant_masks"])

  def length(self, example: dict) -> int:
    """The tokens the whole conversation takes as model input (compare with seq_len)."""
    return len(self._encode(example)[0]) - 1

  def unpadded(self, example: dict, *, whole: bool = False) -> dict[str, np.ndarray] | None:
    """One example at its own length (what the packer packs): input_ids, targets, loss_mask
    [n <= seq_len] and images_lowres/highres [k <= max_images, ...] for its k whole images.
    None when it is longer than seq_len and data.truncation is "drop". With `whole`, never
    cut to seq_len (scoring an answer, mgjax.likelihood, needs all of it)."""
    ids, assistant = self._encode(example)
    # Predict token t+1 from tokens <= t; train only where t+1 is an assistant token.
    if len(ids) > self.seq_len + 1 and not whole:
      if self.truncation == "drop":
        return None
      if self.truncation == "error":
        raise ValueError(f"example {_text(example.get('id', '?'))!r} is {len(ids) - 1} tokens long, more than "
                         f"data.seq_len={self.seq_len}, and data.truncation='error'; raise data.seq_len or set "
                         "data.truncation to 'truncate' or 'drop'")
      cut = whole_turns_cut(assistant, self.seq_len + 1)
      ids, assistant = ids[:cut], assistant[:cut]
    ids, assistant = self._drop_partial_image(ids, assistant)
    ids, assistant = self._drop_images_beyond(self.max_images, ids, assistant)
    num_images = int((ids[:-1] == self.image_token_id).sum()) // self.num_image_tokens
    return {
        "input_ids": ids[:-1],
        "targets": ids[1:],
        "loss_mask": assistant[1:],
        **self._images(example, num_slots=num_images, pad=False)
    }

  def encode_prompt(self, messages: list[dict[str, str]], image_files: list[bytes] = ()) -> dict[str, np.ndarray]:
    """A conversation up to the assistant's next turn, as the model input for generation.

    The same template, <image> expansion and image preprocessing as training, with the
    template's generation prompt (the assistant marker) appended; not padded or truncated.

    Args:
      messages: [{"role": ..., "content": ...}], the last one usually the user's.
      image_files: encoded image files (PNG, JPEG, ...), one per <image> in the messages, in order.

    Returns:
      input_ids [P] int32, images_lowres [max_images, l, l, 3] (with image_grid >= 2
      [max_images, V, l, l, 3]) and images_highres [max_images, h, h, 3] float32 (zeros in
      unused slots).
    """
    ids = self.prompt_ids(messages, len(image_files))
    return {"input_ids": ids, **self._images({"images": image_files}, num_slots=len(image_files))}

  def prompt_ids(self, messages: list[dict[str, str]], num_images: int) -> np.ndarray:
    """encode_prompt's input_ids alone (no image is read): the template with its generation
    prompt, each <image> expanded to the model's image tokens; refused unless the messages
    hold one placeholder per image, within data.max_images."""
    encoded = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    token_ids = list(encoded["input_ids"])
    ids, _ = self._expand_images(token_ids, [0] * len(token_ids))
    num_placeholders = int((ids == self.image_token_id).sum()) // self.num_image_tokens
    if num_placeholders != num_images:
      raise ValueError(
          f"the messages hold {num_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) were given"
      )
    if num_images > self.max_images:
      raise ValueError(f"{num_images} images but the model was trained with data.max_images={self.max_images}")
    return ids

  def _expand_images(self, ids: list[int], assistant: list[int]) -> tuple[np.ndarray, np.ndarray]:
    out_ids, out_mask = [], []
    for token, mask in zip(ids, assistant):
      repeat = self.num_image_tokens if token == self.image_token_id else 1
      out_ids += [token] * repeat
      out_mask += [0 if token == self.image_token_id else mask] * repeat
    return np.asarray(out_ids, np.int32), np.asarray(out_mask, np.float32)

  def _drop_partial_image(self, ids: np.ndarray, assistant: np.ndarray):
    """Truncation must not cut an image's tokens in half: the model places whole images."""
    is_image = ids[:-1] == self.image_token_id  # the last id is only ever a target
    partial = int(is_image.sum()) % self.num_image_tokens
    if partial:
      cut = int(np.nonzero(is_image)[0][-partial])
      ids, assistant = ids[:cut + 1], assistant[:cut + 1]
      ids[cut] = self.pad_id
      assistant[cut] = 0
    return ids, assistant

  def _drop_images_beyond(self, max_images: int, ids: np.ndarray, assistant: np.ndarray):
    """Cuts the conversation before an image that has no slot: its tokens would otherwise
    take another image's features (in a packed row, another conversation's)."""
    is_image = ids[:-1] == self.image_token_id  # the last id is only ever a target
    starts = np.nonzero(is_image & ((np.cumsum(is_image) - 1) % self.num_image_tokens == 0))[0]
    if len(starts) > max_images:
      cut = int(starts[max_images])
      ids, assistant = ids[:cut + 1].copy(), assistant[:cut + 1].copy()
      ids[cut] = self.pad_id
      assistant[cut] = 0
    return ids, assistant

  def _images(self, example: dict, num_slots: int, pad: bool = True) -> dict[str, np.ndarray]:
    image_files = list(example["images"])[:min(num_slots, self.max_images)]
    slots = self.max_images if pad else len(image_files)
    lowres = np.zeros((slots, *self.lowres_shape), np.float32)
    highres = np.zeros((slots, self.highres_size, self.highres_size, 3), np.float32)
    for i, data in enumerate(image_files):
      # As Mini-Gemini: the high-res input through the CLIP processor, the low-res view(s)
      # resized down from it (data.images.mgm_views).
      lowres[i], highres[i] = images.mgm_views(images.decode(data), self.lowres_size, self.highres_size,
                                               self.image_mean, self.image_std, grid=self.image_grid,
                                               global_view=self.image_global, pad_to_square=self.pad_to_square)
    return {"images_lowres": lowres, "images_highres": highres}


TRUNCATION = ("truncate", "drop", "error")


def whole_turns_cut(assistant: np.ndarray, limit: int) -> int:
  """Where to cut a conversation to at most `limit` tokens: after its last assistant turn
  that ends within the limit, so no answer is cut in half; `limit` itself when not even the
  first assistant turn fits (the conversation would otherwise train on nothing)."""
  mask = np.asarray(assistant[:limit + 1]) > 0
  ends = np.nonzero(mask[:-1] & ~mask[1:])[0] + 1  # one past each assistant span's last token
  ends = ends[ends <= limit]
  return int(ends[-1]) if len(ends) else limit


def make_encoder(tokenizer, data_cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict,
                 num_image_tokens: int) -> ConversationEncoder:
  return ConversationEncoder(tokenizer, seq_len=data_cfg.seq_len, num_image_tokens=num_image_tokens,
                             max_images=data_cfg.max_images, lowres_size=model_cfg.vision_lowres.image_size,
                             highres_size=model_cfg.vision_highres.image_size, image_mean=data_cfg.image_mean,
                             image_std=data_cfg.image_std, pad_to_square=bool(data_cfg.get("pad_to_square", False)),
                             image_grid=int(model_cfg.get("image_grid",
                                                          1)), image_global=bool(model_cfg.get("image_global", False)),
                             truncation=data_cfg.get("truncation", "truncate"))


def _this_process(ds: grain.MapDataset) -> grain.MapDataset:
  # Every process reads a disjoint, interleaved share of the records.
  return ds[jax.process_index()::jax.process_count()]


def train_iterator(source, encoder: ConversationEncoder, *, batch_size: int, seed: int, num_threads: int = 2,
                   prefetch: int = 4, replay_source=None, replay_fraction: float = 0.0,
                   packing: bool = False) -> grain.DatasetIterator:
  """An endless, seeded, per-epoch reshuffled stream of per-process batches.

  With a `replay_source` (stage 2: the stage-1 mix), that fraction of the examples is
  drawn from it instead, interleaved deterministically, so specialising on one split
  keeps rehearsing the rest. With `packing`, each row holds as many whole conversations
  as fit in seq_len tokens and max_images image slots (first fit), told apart by
  segment_ids (1, 2, ... per row; 0 is padding) with positions restarting at each one;
  the model masks attention per segment, so nothing else changes. The returned
  iterator's position (get_state/set_state) is saved with each checkpoint.
  """
  # Every process shuffles the whole split the same way (same seed): the global order of
  # examples does not depend on how many processes read it.
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  if replay_source is not None and replay_fraction > 0:
    if not 0 < replay_fraction < 1:
      raise ValueError(f"data.replay_fraction={replay_fraction} must be between 0 and 1")
    replay = grain.MapDataset.source(replay_source).shuffle(seed=seed + 1).repeat(None)
    ds = grain.MapDataset.mix([ds, replay], weights=[1 - replay_fraction, replay_fraction])
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  if not packing and encoder.truncation == "drop":
    # Dropped examples leave holes, so each process batches what is left of its own share
    # (as packing does): global batches then depend on the process count.
    local = _this_process(ds.map(encoder)).to_iter_dataset(options)  # None (dropped) is skipped
    return iter(local.batch(batch_size, drop_remainder=True))
  if not packing:
    # Global batch g is local batches g*P .. g*P+P-1, process p reading the p-th: the global
    # batch (rows of process 0, then 1, ...) is the same for any process count P, so a
    # 2-host run computes what a 1-host run does. Batching is lazy: a process only reads
    # and decodes its own rows.
    local = ds.map(encoder).batch(batch_size, drop_remainder=True)
    return iter(_this_process(local).to_iter_dataset(options))
  # Packing fills each process's rows from its own share of the examples (packing the
  # global stream would have every process read all of it), so packed global batches
  # depend on the process count; the examples and their order within a share do not.
  # A batch's worth of bins fills rows well and keeps examples close to their epoch.
  rows = pack(_this_process(ds).map(encoder.unpadded).to_iter_dataset(options), encoder, num_bins=batch_size)
  return iter(rows.batch(batch_size, drop_remainder=True))


def pack(examples: grain.IterDataset, encoder: ConversationEncoder, *, num_bins: int) -> grain.IterDataset:
  """Unpadded examples (ConversationEncoder.unpadded) -> packed rows in the batch layout."""
  tokens, slots = encoder.seq_len, encoder.max_images
  packed = grain.experimental.FirstFitPackIterDataset(
      examples, length_struct={
          "input_ids": tokens,
          "targets": tokens,
          "loss_mask": tokens,
          "images_lowres": slots,
          "images_highres": slots
      }, num_packing_bins=num_bins, shuffle_bins=False)

  def to_batch_layout(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: row[k] for k in ("input_ids", "targets", "loss_mask", "images_lowres", "images_highres")}
    out["segment_ids"] = row["input_ids_segment_ids"].astype(np.int32)
    out["positions"] = row["input_ids_positions"].astype(np.int32)
    return out

  return packed.map(to_batch_layout)


def eval_batches(source, encoder: ConversationEncoder, *, batch_size: int, num_threads: int = 2):
  """Every record of a split once, in order; the last batch padded with loss-free rows.

  Every process yields the same number of batches (the process-local batch count of the
  largest share), so the jitted eval step runs in lockstep on all hosts.
  """
  ds = _this_process(grain.MapDataset.source(source)).map(encoder)
  num_batches = -(-len(source) // (batch_size * jax.process_count()))
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)
  examples = iter(ds.to_iter_dataset(options))
  empty = None
  for _ in range(num_batches):
    rows = []
    for example in examples:
      rows.append(example)
      if len(rows) == batch_size:
        break
    if empty is None:  # the padding row, made once from the first example
      empty = _empty_like(rows[0] if rows else None)
    rows += [empty] * (batch_size - len(rows))
    yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _empty_like(example: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
  if example is None:
    raise ValueError("cannot pad an eval batch: this process has no records of the split")
  return {k: np.zeros_like(v) for k, v in example.items()}


def batch_spec(data_cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict,
               batch_sharding: jax.sharding.Sharding | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """The global training batch `train_iterator` yields (over all processes), as shapes: [B, T]
  token arrays, images_lowres [B, M, l, l, 3] (or [B, M, V, l, l, 3], V low-res views per
  image with model.image_grid >= 2) and images_highres [B, M, h, h, 3]. For compiling the
  train step ahead of time (mgjax.plan)."""
  from mgjax.models import vlm  # the image shapes are the model's

  b, t, m = data_cfg.batch_size, data_cfg.seq_len, data_cfg.max_images
  image_tokens = vlm.num_image_tokens(model_cfg)
  if t <= image_tokens * min(m, 1):
    raise ValueError(f"data.seq_len={t} cannot hold one image's {image_tokens} tokens; raise it, "
                     f"e.g. --config.data.seq_len=2048")
  lowres, highres = vlm.lowres_image_shape(model_cfg), model_cfg.vision_highres.image_size

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)

  return {
      "input_ids": spec((b, t), np.int32),
      "targets": spec((b, t), np.int32),
      "loss_mask": spec((b, t), np.float32),
      "segment_ids": spec((b, t), np.int32),
      "positions": spec((b, t), np.int32),
      "images_lowres": spec((b, m, *lowres), np.float32),
      "images_highres": spec((b, m, highres, highres, 3), np.float32),
  }


def length_report(sources: dict[str, Any], encoder: ConversationEncoder, *,
                  max_examples: int = 1000) -> dict[str, dict[str, Any]]:
  """Per split: how many examples are longer than the encoder's seq_len, and by how much.

  Lengths are model input tokens (chat template and expanded images included). A split
  of more than `max_examples` is estimated from that many evenly spaced examples
  ("checked" < "examples").
  """
  report = {}
  for split, source in sources.items():
    n = len(source)
    if not n:
      continue
    picked = range(n) if n <= max_examples else np.unique(np.linspace(0, n - 1, max_examples).astype(int))
    lengths = np.array([encoder.length(source[int(i)]) for i in picked])
    excess = lengths[lengths > encoder.seq_len] - encoder.seq_len
    report[split] = {
        "examples": n,
        "checked": len(lengths),
        "over": int(excess.size),
        "fraction": float(excess.size / len(lengths)),
        "p95_length": int(np.percentile(lengths, 95)),
        "max_length": int(lengths.max()),
        "median_excess": int(np.median(excess)) if excess.size else 0,
        "max_excess": int(excess.max()) if excess.size else 0,
    }
  return report


def check_lengths(data_cfg: ml_collections.ConfigDict, encoder: ConversationEncoder, sources: dict[str, Any], *,
                  log: bool = True) -> dict[str, dict[str, Any]]:
  """The trainer's start-up look at conversation lengths against data.seq_len.

  Prints (with `log`) one line per split with conversations longer than seq_len, and a
  warning when a split's share of them is above data.truncation_warn; with
  data.truncation='error' any such conversation stops the run here, on every process.
  """
  report = length_report(sources, encoder, max_examples=int(data_cfg.get("length_check_examples", 1000)))
  seq_len, mode = encoder.seq_len, encoder.truncation
  action = {"truncate": "cut after their last whole answer that fits", "drop": "left out", "error": "an error"}[mode]
  threshold = float(data_cfg.get("truncation_warn", 0.01))
  lines, warnings = [], []
  for split, r in report.items():
    if not r["over"]:
      continue
    of = f"{r['checked']} checked of {r['examples']}" if r["checked"] < r["examples"] else str(r["examples"])
    lines.append(f"{split}: {r['over']} of {of} conversations ({r['fraction']:.1%}) are longer than data.seq_len="
                 f"{seq_len} (by {r['median_excess']} tokens at the median, {r['max_excess']} at most; "
                 f"p95 length {r['p95_length']}); data.truncation={mode!r}: they are {action}")
    if r["fraction"] > threshold:
      warnings.append(split)
  if mode == "error" and lines:
    raise ValueError("data.truncation='error' and conversations are longer than data.seq_len:\n  " +
                     "\n  ".join(lines) + "\nraise data.seq_len, or set data.truncation to 'truncate' or 'drop'")
  if log:
    for line in lines:
      logging.info("lengths: %s", line)
    if warnings:
      print(
          f"warning: more than data.truncation_warn={threshold:.0%} of the conversations of {warnings} are "
          f"longer than data.seq_len={seq_len}:\n  " + "\n  ".join(lines) +
          "\n  raise --config.data.seq_len (to about the p95 length), or choose --config.data.truncation",
          file=sys.stderr, flush=True)
    elif not lines:
      logging.info("lengths: every conversation checked fits data.seq_len=%d", seq_len)
  return report
