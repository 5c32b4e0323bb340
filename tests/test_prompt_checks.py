"""The generation prompt coverage check: it flags prompts that ignore the request, not
correct prompts that say the same in other words, and its threshold is a setting.

Measured on the bundled sample's 1,200 generation requests (every prompt right by
construction), beside the same requests answered with another request's prompt or with
the objects left out: at the default 0.5 no correct prompt is flagged (precision 1.0),
and 891 of 1,200 swapped prompts and 821 of 1,200 without their objects are (recall 0.74
and 0.68); at 0.8, 1,180 and 1,200, still with no correct prompt flagged. (Before the
lexicon, 581 of the 1,200 correct prompts were flagged at 0.5.)
"""

import json
import random

import ml_collections
import pytest

from mgjax.data import prompts, sample


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
  """(request, prompt) of the full sample's generation file, as the build reads it."""
  paths = sample.write_sample_sources(str(tmp_path_factory.mktemp("sample")), seed=0, n_understanding=0,
                                      n_generation=1200, n_text=0)
  records = json.loads(open(paths["generation"]).read())
  return [(r["conversations"][0]["value"], prompts.extract(r["conversations"][1]["value"])) for r in records]


def _flagged(pairs, threshold, lexicon=None):
  return sum(prompts.coverage(request, prompt, lexicon) < threshold for request, prompt in pairs)


def test_a_prompt_in_other_words_covers_the_request():
  assert prompts.coverage("Draw a scarlet disc. <GEN>",
                          "One red circle, on a plain white background, simple vector illustration.") == 1.0
  assert prompts.coverage(
      "Could you show me a pair of azure boxes against a sky-blue backdrop drawn in graphite? <GEN>",
      "Two blue squares, on a plain light blue background, pencil sketch.") == 1.0
  assert prompts.content_words("Please paint a trio of crimson wedges above a jet-black box. <GEN>") == [
      "three", "red", "triangle", "top", "black", "square"
  ]
  # What the request asked for and the prompt left out still counts as missing.
  assert prompts.coverage("Draw a scarlet disc. <GEN>", "One blue square.") == 0.0
  assert prompts.coverage("Draw two crimson discs. <GEN>", "Two blue circles.") == pytest.approx(2 / 3)


def test_no_correct_sample_prompt_is_flagged(generation):
  assert len(generation) == 1200
  assert _flagged(generation, prompts.LOW_COVERAGE) == 0
  assert all(prompts.coverage(request, prompt) == 1.0 for request, prompt in generation)


def test_flag_precision_and_recall_on_wrong_prompts(generation):
  rng = random.Random(1)
  swapped, no_objects = [], []
  for request, prompt in generation:
    other = prompt
    while other == prompt:
      other = rng.choice(generation)[1]
    swapped.append((request, other))
    no_objects.append((request, prompt.split(", ", 1)[1]))  # "on a plain ... background, <style>" only
  for threshold, (n_swapped, n_no_objects) in {0.5: (891, 821), 0.8: (1180, 1200)}.items():
    assert _flagged(generation, threshold) == 0  # precision 1.0
    assert _flagged(swapped, threshold) == n_swapped
    assert _flagged(no_objects, threshold) == n_no_objects


def test_threshold_and_synonyms_are_settings():
  conversations = [("a", "s", [{
      "role": "user",
      "content": "Draw a wug on a red mat. <GEN>"
  }, {
      "role": "assistant",
      "content": "<h>A small bird on a red mat.</h>"
  }])]
  default = prompts.report(conversations)
  assert default["coverage"] == {"n": 1, "mean": 0.667, "p10": 0.667, "threshold": 0.5, "below_0.5": 0}
  strict = prompts.report(conversations, checks=prompts.Settings.from_dict({"low_coverage": 0.9}))
  assert strict["coverage"]["below_0.9"] == 1 and strict["low_coverage"][0]["id"] == "a"
  assert prompts.low_count(strict["coverage"]) == (0.9, 1)
  taught = prompts.settings(
      ml_collections.ConfigDict({"prompt_checks": {
          "low_coverage": 0.9,
          "synonyms": {
              "bird": ["wug"]
          }
      }}))
  assert prompts.report(conversations, checks=taught)["coverage"]["below_0.9"] == 0
  with pytest.raises(ValueError, match=r"prompt_checks.low_coverage=2: a share of the request's words, 0 to 1"):
    prompts.Settings.from_dict({"low_coverage": 2})
  with pytest.raises(ValueError, match=r"prompt_checks: unknown keys \['low'\]"):
    prompts.Settings.from_dict({"low": 0.3})
  with pytest.raises(ValueError, match=r"prompt_checks.repeated_min_requests=1"):
    prompts.Settings.from_dict({"repeated_min_requests": 1})
