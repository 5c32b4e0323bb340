"""The evaluator registry: config.evals names what runs, and the generation-intent score
says whether the model answers with a <h> prompt exactly when an image is asked for."""

import ml_collections
import pytest

from conftest import tiny_config
from mgjax import base_config, stats
from mgjax.evaluators import DECODED, LOWER_IS_BETTER, compare, decoding, generation_intent

ASK = [{"role": "user", "content": "Draw a red fox in the snow. <GEN>"}]
QUESTION = [{"role": "user", "content": "What colour is the fox?"}]
PROMPT = "Here it is: <h>a red fox in the snow</h>"


def _answers(turns: list[tuple[list[dict], str, str]]) -> decoding.Answers:
  """(conversation, reference, the model's answer) per turn, one record each."""
  return decoding.Answers([(c, [], ref) for c, ref, _ in turns], [a for _, _, a in turns], list(range(len(turns))))


def _intent(requests: list[str], questions: list[str]) -> dict:
  cache = decoding.AnswerCache.of({
      "val_generation": _answers([(ASK, PROMPT, a) for a in requests]),
      "val_understanding": _answers([(QUESTION, "red", a) for a in questions]),
  })
  settings = ml_collections.ConfigDict(dict(splits=("val_generation", "val_understanding", "val_text")))
  return generation_intent.run(cache, settings)[generation_intent.KEY]


def test_generation_intent_counts_prompts_given_and_missed():
  # 3 image requests, 2 answered with a prompt; 4 questions, 1 wrongly answered with one.
  scores = _intent([PROMPT, "I cannot draw.", "<h>a fox</h>"], ["red", "Red.", "<h>a red fox</h>", "orange"])
  assert scores["num_answers"] == 7 and scores["num_requests"] == 3
  assert scores["missed_requests"] == 1 and scores["unasked_prompts"] == 1
  assert scores["intent_precision"] == pytest.approx(2 / 3)
  assert scores["intent_recall"] == pytest.approx(2 / 3)
  for name in ("intent_precision", "intent_recall"):
    lo, hi = scores[f"{name}_ci95"]
    assert 0.0 <= lo < scores[name] < hi <= 1.0
  # Records of the two splits stay apart: no two turns share a bootstrap group.
  assert len(set(scores["per_answer"]["record"])) == 7


def test_a_model_that_never_gives_a_prompt_has_recall_zero_and_no_precision():
  scores = _intent(["No.", "No."], ["red"])
  assert scores["intent_recall"] == 0.0 and scores["missed_requests"] == 2
  assert "intent_precision" not in scores  # no prompt given: nothing to be precise about


def test_stage_comparison_pairs_intent_precision_and_recall_answer_by_answer():
  # 400 records: enough that "no change" reads "held" (fewer cannot rule out 3/n).
  before = {generation_intent.KEY: _intent(["No."] * 100 + [PROMPT] * 100, ["red"] * 200)}
  after = {generation_intent.KEY: _intent([PROMPT] * 200, ["red"] * 200)}
  compared = compare.compare(after, before, margin=0.02)[generation_intent.KEY]
  assert compared["intent_recall"]["difference"] == pytest.approx(0.5)
  assert compared["intent_recall"]["verdict"] == "improved"
  assert compared["intent_precision"]["difference"] == pytest.approx(0.0)
  assert compared["intent_precision"]["verdict"] == "held"


def test_a_ratio_interval_resamples_records_and_recomputes_the_ratio():
  hits, of = [1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]
  lo, hi = stats.interval(hits, of=of)
  assert lo < 3 / 4 < hi
  # With every denominator 1 the ratio is the mean, and the interval the mean's.
  assert stats.interval(hits, of=[1] * 6) == stats.interval(hits)
  same = stats.paired_ratio_difference((hits, of), (hits, of), list(range(6)))
  assert same["difference"] == 0.0 and same["ci95"][0] < 0 < same["ci95"][1]
  with pytest.raises(ValueError, match="denominator"):
    stats.interval(hits, of=[0] * 6)


def test_the_registry_names_every_decoded_evaluator_and_the_config_runs_them(tmp_path):
  assert sorted(DECODED) == ["generation", "generation_intent", "understanding"]
  assert "spurious_prompt_rate" in LOWER_IS_BETTER
  config = tiny_config(1, str(tmp_path))
  assert sorted(config.evals) == sorted(DECODED)
  base_config.check_train(config)  # the defaults run


@pytest.mark.parametrize("change, problem", [
    (lambda c: c.evals.generation.update(splits=("val_nowhere",)),
     r"evals\.generation\.splits=\('val_nowhere',\): none of them is in data\.val_splits"),
    (lambda c: c.evals.understanding.update(every=-1), r"evals\.understanding\.every=-1 must be 0"),
    (lambda c: c.evals.generation_intent.update(every=c.train.eval_every + 1),
     r"evals\.generation_intent\.every=\d+ must be a multiple of train\.eval_every=\d+"),
])
def test_evaluator_settings_that_cannot_run_are_refused_before_training(tmp_path, change, problem):
  config = tiny_config(1, str(tmp_path))
  change(config)
  with pytest.raises(base_config.ConfigError, match=problem):
    base_config.check_train(config)


def test_an_evaluator_name_that_is_not_registered_is_refused(tmp_path):
  config = tiny_config(1, str(tmp_path))
  config.unlock()
  config.evals.vqa = dict(splits=("val_understanding",), every=0)
  with pytest.raises(base_config.ConfigError, match=r"evals\.vqa: no evaluator of that name \(known: "):
    base_config.check_train(config)
