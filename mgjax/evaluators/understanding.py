"""On short checkable answers (the sample's), the exact-match accuracy of every assistant turn
given the reference conversation before it. Beside it `chance`: what answering every
question with its most common training answer would score (a random one of them when
tied), i.e. a model that never looks at the image. `spurious_prompt_rate`: answers that
wrongly hold a <h> prompt."""

from __future__ import annotations

import collections
from typing import Any, Callable

import numpy as np

from mgjax import decode
from mgjax.data.records import IMAGE_PLACEHOLDER
from mgjax.evaluators import decoding
from mgjax.evaluators.text import normalize_answer

NAME = "understanding"
LOWER_IS_BETTER = frozenset({"spurious_prompt_rate"})


def _question(messages: list[dict]) -> str:
  return normalize_answer(messages[-1]["content"].replace(IMAGE_PLACEHOLDER, ""))


def majority_answers(train_source, max_records: int = 20000) -> dict[str, tuple[str, ...]]:
  """Question -> its most common answers in the training split (several when tied), for
  the chance baseline. Ties are kept rather than broken by whichever came first, so the
  baseline does not depend on the order the split was written in."""
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for i in range(min(len(train_source), max_records)):
    example = train_source[i]
    if decoding.category(example) != "understanding":
      continue
    messages, _ = decoding.conversation(example)
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


def run(answers: decoding.AnswerCache, settings, *, majority: Callable[[], dict] | None = None,
        **_) -> dict[str, dict[str, Any]]:
  """{split: scores} for every split in settings.splits; `majority` gives the training mix's
  most common answers (majority_answers) for the chance level, or None (no chance level)."""
  scores = {}
  for split in answers.splits(settings.splits):
    got = answers(split)
    scores[split] = decoding.with_intervals(
        {
            "accuracy":
                [float(normalize_answer(a) == normalize_answer(ref)) for a, (_, _, ref) in zip(got.answers, got.turns)],
            "spurious_prompt_rate": [float(decode.extract_image_prompt(a) is not None) for a in got.answers],
        }, got.records)
    table = majority() if majority is not None else None
    if table is not None and got.turns:
      scores[split]["chance"] = chance([(prefix, ref) for prefix, _, ref in got.turns], table)
  return scores
