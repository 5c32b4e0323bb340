"""The model's answers to a validation split, decoded once per evaluation and shared by
every evaluator that scores them."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np

from mgjax import decode, stats
from mgjax.data.records import IMAGE_PLACEHOLDER


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def conversation(example: dict) -> tuple[list[dict[str, str]], list[bytes]]:
  """A TFDS example's messages (as chat dicts) and encoded images."""
  m = example["messages"]
  messages = [{"role": _text(r), "content": _text(c)} for r, c in zip(m["role"], m["content"])]
  return messages, list(example["images"])


def category(example: dict) -> str:
  return _text(example["category"])


def assistant_turns(source) -> Iterable[tuple[list[dict], list[bytes], str]]:
  """(conversation before the turn, its images, reference answer) for every assistant turn."""
  for i in range(len(source)):
    messages, images = conversation(source[i])
    for t, message in enumerate(messages):
      if message["role"] == "assistant" and t > 0:
        # Only the images whose <image> slots are in the prefix are fed.
        n_images = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages[:t])
        yield messages[:t], images[:n_images], message["content"]


@dataclasses.dataclass
class Answers:
  """Every assistant turn of one split with the model's own answer in its place."""
  turns: list[tuple[list[dict], list[bytes], str]]  # (conversation before it, images, reference)
  answers: list[str]
  records: list[int]  # the record each turn belongs to (the bootstrap's groups)


def answer_every_turn(generator: decode.Generator, source, max_new_tokens: int) -> Answers:
  turns, records = [], []
  for i in range(len(source)):
    for turn in assistant_turns([source[i]]):
      turns.append(turn)
      records.append(i)
  answers = generator.generate([p for p, _, _ in turns], [im for _, im, _ in turns], max_new_tokens=max_new_tokens)
  return Answers(turns, answers, records)


class AnswerCache:
  """Each split's answers, decoded on first use and kept for this evaluation's other evaluators
  (understanding and generation_intent read the same answers)."""

  def __init__(self, generator: decode.Generator, val_sources: dict[str, Any], max_new_tokens: int):
    self._generator, self._sources, self._max_new_tokens = generator, val_sources, max_new_tokens
    self._answers: dict[str, Answers] = {}

  @classmethod
  def of(cls, answers: dict[str, Answers]) -> AnswerCache:
    """A cache of answers decoded elsewhere (another harness, a saved evaluation)."""
    cache = cls(None, {split: None for split in answers}, 0)
    cache._answers = dict(answers)
    return cache

  def splits(self, wanted: Iterable[str]) -> list[str]:
    """The wanted splits this run evaluates (a split the dataset holds no records of is not)."""
    return [split for split in wanted if split in self._sources]

  def __call__(self, split: str) -> Answers:
    if split not in self._answers:
      self._answers[split] = answer_every_turn(self._generator, self._sources[split], self._max_new_tokens)
    return self._answers[split]


def with_intervals(per_answer: dict[str, list[float]], records: list[int]) -> dict[str, Any]:
  """Each score's mean and 95% interval, and the per-answer values a paired comparison
  (stage 2 against where it started) resamples."""
  scores: dict[str, Any] = {"num_answers": len(records)}
  if records:  # none: the split holds no answer to score, and no score is shown
    for name, values in per_answer.items():
      scores[name] = float(np.mean(values))
      scores[f"{name}_ci95"] = list(stats.interval(values, records, bounds=(0.0, 1.0)))
  scores["per_answer"] = {"record": records, **per_answer}
  return scores
