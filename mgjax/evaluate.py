"""Scores beyond loss: decode the held-out sets and check what the model answers.

  generation     asked with " <GEN>", does the answer carry a well-formed <h>...</h>
                 prompt (format_rate), and how close is that prompt to the reference
                 (prompt_f1: SQuAD-style token F1, 0 for a missing prompt)?
  understanding  on short checkable answers (the sample's), exact-match accuracy of
                 every assistant turn given the reference conversation before it; beside
                 it `chance`: what answering every question with its most common training
                 answer would score (a random one of them when tied), i.e. a model that
                 never looks at the image.
                 `spurious_prompt_rate`: answers that wrongly hold a <h> prompt.

Losses come from the trainer's own evaluation; this module only decodes and scores.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Iterable

import numpy as np

from mgjax import decode
from mgjax.data.records import IMAGE_PLACEHOLDER

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
  """Lower case, punctuation and surrounding/duplicate whitespace removed."""
  return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def token_f1(prediction: str, reference: str) -> float:
  """Bag-of-words F1 between two normalised texts (the SQuAD metric)."""
  pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
  if not pred or not ref:
    return float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if not common:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def conversation(example: dict) -> tuple[list[dict[str, str]], list[bytes]]:
  """A TFDS example's messages (as chat dicts) and encoded images."""
  m = example["messages"]
  messages = [{"role": _text(r), "content": _text(c)} for r, c in zip(m["role"], m["content"])]
  return messages, list(example["images"])


def assistant_turns(source) -> Iterable[tuple[list[dict], list[bytes], str]]:
  """(conversation before the turn, its images, reference answer) for every assistant turn."""
  for i in range(len(source)):
    messages, images = conversation(source[i])
    for t, message in enumerate(messages):
      if message["role"] == "assistant" and t > 0:
        # Only the images whose <image> slots are in the prefix are fed.
        n_images = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages[:t])
        yield messages[:t], images[:n_images], message["content"]


def _question(messages: list[dict]) -> str:
  return normalize_answer(messages[-1]["content"].replace(IMAGE_PLACEHOLDER, ""))


def majority_answers(train_source, max_records: int = 20000) -> dict[str, tuple[str, ...]]:
  """Question -> its most common answers in the training split (several when tied), for
  the chance baseline. Ties are kept rather than broken by whichever came first, so the
  baseline does not depend on the order the split was written in."""
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for i in range(min(len(train_source), max_records)):
    example = train_source[i]
    if _text(example["category"]) != "understanding":
      continue
    messages, _ = conversation(example)
    for t in range(1, len(messages)):
      if messages[t]["role"] == "assistant" and messages[t - 1]["role"] == "user":
        counts[_question(messages[:t])][normalize_answer(messages[t]["content"])] += 1
  majority = {}
  for q, c in counts.items():
    top = max(c.values())
    majority[q] = tuple(sorted(a for a, n in c.items() if n == top))
  return majority


def chance(turns: list[tuple[list[dict], str]], majority: dict[str, tuple[str, ...]]) -> float:
  """Expected accuracy on (conversation before the answer, reference) turns of a blind
  guesser that answers with a most common training answer, picked at random when k are
  tied: a reference among them is right with probability 1/k."""

  def expected(prefix, ref):
    tied = majority.get(_question(prefix), ())
    return 1 / len(tied) if normalize_answer(ref) in tied else 0.0

  return float(np.mean([expected(prefix, ref) for prefix, ref in turns]))


def _answer_every_turn(generator: decode.Generator, source, max_new_tokens: int):
  """Every assistant turn of `source` with the model's own answer in its place."""
  items = list(assistant_turns(source))
  answers = generator.generate([p for p, _, _ in items], [im for _, im, _ in items], max_new_tokens=max_new_tokens)
  return items, answers


def score_generation(generator: decode.Generator, source, *, max_new_tokens: int) -> dict[str, float]:
  items, answers = _answer_every_turn(generator, source, max_new_tokens)
  prompts = [decode.extract_image_prompt(a) for a in answers]
  references = [decode.extract_image_prompt(ref) or ref for _, _, ref in items]
  return {
      "format_rate": float(np.mean([p is not None for p in prompts])),
      "prompt_f1": float(np.mean([token_f1(p, r) if p is not None else 0.0 for p, r in zip(prompts, references)])),
      "num_answers": len(items),
  }


def score_accuracy(generator: decode.Generator, source, *, max_new_tokens: int,
                   majority: dict[str, tuple[str, ...]] | None = None) -> dict[str, float]:
  items, answers = _answer_every_turn(generator, source, max_new_tokens)
  correct = [normalize_answer(a) == normalize_answer(ref) for a, (_, _, ref) in zip(answers, items)]
  scores = {
      "accuracy": float(np.mean(correct)),
      "spurious_prompt_rate": float(np.mean([decode.extract_image_prompt(a) is not None for a in answers])),
      "num_answers": len(items),
  }
  if majority is not None:
    scores["chance"] = chance([(prefix, ref) for prefix, _, ref in items], majority)
  return scores


def evaluate(generator: decode.Generator, val_sources: dict[str, Any], losses: dict[str, float], eval_cfg,
             majority: dict[str, tuple[str, ...]] | None = None) -> dict[str, dict[str, float]]:
  """{split: {"loss": ..., and the split's scores}} for every validation split.

  `majority` (from `majority_answers` over the training mix) adds the chance level to
  the accuracy splits; it depends on the data only, so a run computes it once.
  """
  results = {}
  for split, source in val_sources.items():
    results[split] = {"loss": losses[split]}
    if not eval_cfg.decode:
      continue
    if split in eval_cfg.generation_splits:
      results[split].update(score_generation(generator, source, max_new_tokens=eval_cfg.max_new_tokens))
    if split in eval_cfg.accuracy_splits:
      results[split].update(score_accuracy(generator, source, max_new_tokens=eval_cfg.max_new_tokens,
                                           majority=majority))
  return results
