"""How likely a model finds a given answer: the scoring half of evaluation, beside decoding.

Multiple-choice benchmarks (lmms-eval's `loglikelihood` requests) ask, for a conversation and
a candidate answer, how well the answer fits. The answer is appended as the assistant's turn
and encoded exactly as training encodes a conversation (chat template, <image> expansion,
image preprocessing, the template's assistant mask), so its score is the training loss on
that turn: the mean cross-entropy of the answer's tokens, the template's end-of-turn token
included, which is what lmms-eval's LLaVA model returns. Lower is better, as lmms-eval's
multiple-choice scoring expects (it takes the argmin).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgjax.data.pipeline import ConversationEncoder


@dataclasses.dataclass(frozen=True)
class AnswerScore:
  loss: float  # mean cross-entropy (nats) of the answer's tokens
  num_tokens: int  # how many tokens it took, the end-of-turn token included
  greedy: bool  # greedy decoding would have produced every one of them


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens"))
def _token_scores(graphdef: nnx.GraphDef, params: Any, batch: Mapping[str, jax.Array], num_tokens: int):
  """Per-position cross-entropy [B, T] of the targets, and whether each target is the
  token greedy decoding picks there (decoding never picks the image token, nor ids past the
  tokenizer's vocabulary, which padding may have added to the model's)."""
  model = nnx.merge(graphdef, params)
  logits = model(batch["input_ids"], batch["images_lowres"], batch["images_highres"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"]).astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
  allowed = (jnp.arange(logits.shape[-1]) < num_tokens) & (jnp.arange(logits.shape[-1]) != model.image_token_id)
  greedy = jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1) == batch["targets"]
  return loss, greedy


def _answer_row(encoder: ConversationEncoder, conversation: Sequence[Mapping[str, str]], images: Sequence[Any],
                answer: str) -> dict[str, np.ndarray]:
  """The conversation with `answer` as the assistant's next turn, encoded whole, with
  `loss_mask` on that turn's tokens only (not on earlier assistant turns)."""
  messages = [dict(m) for m in conversation]
  prompt = encoder.prompt_ids(messages, len(images))
  prompt_len = len(prompt)
  messages.append({"role": "assistant", "content": answer})
  example = {
      "messages": {
          "role": [m["role"] for m in messages],
          "content": [m["content"] for m in messages]
      },
      "images": list(images)
  }
  row = encoder.unpadded(example, whole=True)
  # The template's generation prompt must be the start of the assistant turn it renders;
  # else the tokens after prompt_len would not be the answer's.
  whole = np.concatenate([row["input_ids"], row["targets"][-1:]])
  if not np.array_equal(whole[:prompt_len], prompt):
    raise ValueError("the chat template renders a conversation's generation prompt differently from the start of "
                     "its assistant turn: answers cannot be scored with it")
  # targets[t] is token t + 1: the answer's tokens are targets[prompt_len - 1:].
  row["loss_mask"] = row["loss_mask"] * (np.arange(len(row["targets"])) >= prompt_len - 1)
  if not row["loss_mask"].any():
    raise ValueError(f"answer {answer!r}: no token of it is scored (empty, or the template masks it)")
  return row


def score_answers(graphdef: nnx.GraphDef, params: Any, encoder: ConversationEncoder,
                  conversations: Sequence[Sequence[Mapping[str, str]]], images: Sequence[Sequence[Any]],
                  answers: Sequence[str], *, num_tokens: int, batch_size: int = 8,
                  length_multiple: int = 64) -> list[AnswerScore]:
  """Each answer's score as the assistant's next turn of its conversation.

  Args:
    graphdef, params: the MiniGemini (nnx.split); params may be split over a mesh (run under
      `jax.set_mesh` and the logical axis rules, every process passing the same inputs).
    encoder: the training ConversationEncoder (decode.Generator.encoder).
    conversations: each a list of {"role", "content"} messages, <image> marking images.
    images: per conversation, its images (encoded files or PIL images) in <image> order.
    answers: one candidate answer per conversation.
    num_tokens: the tokenizer's vocabulary size (see `_token_scores`).
    batch_size: rows per forward pass (a fixed shape: the last batch is padded).
    length_multiple: rows are padded to a multiple of this (few compiled shapes).
  """
  if not len(conversations) == len(images) == len(answers):
    raise ValueError(f"{len(conversations)} conversations, {len(images)} image lists, {len(answers)} answers")
  rows = [_answer_row(encoder, c, i, a) for c, i, a in zip(conversations, images, answers)]
  scores = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    length = -(-max(len(r["input_ids"]) for r in chunk) // length_multiple) * length_multiple
    batch = _right_pad(chunk + [chunk[0]] * (batch_size - len(chunk)), length, encoder)
    loss, greedy = (np.asarray(x) for x in _token_scores(graphdef, params, batch, num_tokens))
    for i, row in enumerate(chunk):
      mask = batch["loss_mask"][i] > 0
      scores.append(AnswerScore(float(loss[i][mask].mean()), int(mask.sum()), bool(greedy[i][mask].all())))
  return scores


def _right_pad(rows: list[dict[str, np.ndarray]], length: int, encoder: ConversationEncoder) -> dict[str, np.ndarray]:
  """Rows of their own lengths as one [B, length] batch, each its own segment, every image
  slot filled with zeros past a row's images (as training batches are)."""
  batch = {
      "input_ids": np.full((len(rows), length), encoder.pad_id, np.int32),
      "targets": np.full((len(rows), length), encoder.pad_id, np.int32),
      "loss_mask": np.zeros((len(rows), length), np.float32),
      "segment_ids": np.zeros((len(rows), length), np.int32),
      "positions": np.zeros((len(rows), length), np.int32),
  }
  slots = encoder.max_images  # as generation batches: one compiled shape whatever the images
  lowres = np.zeros((len(rows), slots, *encoder.lowres_shape), np.float32)
  highres = np.zeros((len(rows), slots, encoder.highres_size, encoder.highres_size, 3), np.float32)
  for i, row in enumerate(rows):
    n, k = len(row["input_ids"]), len(row["images_lowres"])
    for key in ("input_ids", "targets", "loss_mask"):
      batch[key][i, :n] = row[key]
    batch["segment_ids"][i, :n] = 1
    batch["positions"][i, :n] = np.arange(n)
    lowres[i, :k], highres[i, :k] = row["images_lowres"], row["images_highres"]
  return {**batch, "images_lowres": lowres, "images_highres": highres}
