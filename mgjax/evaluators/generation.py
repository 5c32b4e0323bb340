"""Asked for an image (the user turn ends with " <GEN>"), does the answer carry a well-formed
<h>...</h> prompt (format_rate), and how close is that prompt to the reference (prompt_f1:
SQuAD-style token F1, 0 for a missing prompt; prompt_exact: the share that equal it, case,
punctuation and spacing aside)?"""

from __future__ import annotations

from typing import Any

from mgjax import decode
from mgjax.evaluators import decoding
from mgjax.evaluators.text import normalize_answer, token_f1

NAME = "generation"
LOWER_IS_BETTER = frozenset()


def run(answers: decoding.AnswerCache, settings, **_) -> dict[str, dict[str, Any]]:
  """{split: scores} for every split in settings.splits."""
  scores = {}
  for split in answers.splits(settings.splits):
    got = answers(split)
    prompts = [decode.extract_image_prompt(a) for a in got.answers]
    references = [decode.extract_image_prompt(ref) or ref for _, _, ref in got.turns]
    scores[split] = decoding.with_intervals(
        {
            "format_rate": [float(p is not None) for p in prompts],
            "prompt_f1": [token_f1(p, r) if p is not None else 0.0 for p, r in zip(prompts, references)],
            # Every attribute carried over, in the reference's words: stricter than F1, where
            # the words every prompt shares already score.
            "prompt_exact": [
                float(p is not None and normalize_answer(p) == normalize_answer(r))
                for p, r in zip(prompts, references)
            ],
        },
        got.records)
  return scores
