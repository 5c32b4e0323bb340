"""The decoded scores' uncertainty: bootstrap intervals over records, paired differences, verdicts."""

import numpy as np
import pytest

from mgjax import stats
from mgjax.evaluators import compare


def test_the_interval_covers_the_true_rate_about_95_times_in_100():
  rng = np.random.default_rng(0)
  covered = 0
  for trial in range(200):
    answers = rng.random(300) < 0.6
    lo, hi = stats.interval(answers, resamples=1000, seed=trial)
    covered += lo <= 0.6 <= hi
  assert 0.90 <= covered / 200 <= 0.99


def test_the_interval_has_the_binomial_width_and_is_the_same_every_time():
  answers = np.r_[np.ones(1200), np.zeros(800)]  # 0.6 on 2000 answers
  lo, hi = stats.interval(answers)
  half = 1.96 * np.sqrt(0.6 * 0.4 / 2000)
  assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
  assert lo < 0.6 < hi
  assert stats.interval(answers) == (lo, hi)


def test_answers_of_one_record_are_resampled_together():
  # Three answers per record that are always all right or all wrong carry the information
  # of one answer: the interval is as wide as one answer per record, not sqrt(3) narrower.
  per_record = np.r_[np.ones(60), np.zeros(40)]
  tripled, records = np.repeat(per_record, 3), np.repeat(np.arange(100), 3)
  clustered = stats.interval(tripled, records)
  naive = stats.interval(tripled)
  assert clustered == pytest.approx(stats.interval(per_record), abs=0.01)
  assert clustered[1] - clustered[0] > 1.5 * (naive[1] - naive[0])


def test_a_paired_difference_is_far_tighter_than_the_scores_apart():
  rng = np.random.default_rng(1)
  before = (rng.random(1000) < 0.6).astype(float)
  after = before.copy()
  flips = rng.choice(1000, 30, replace=False)  # the same answers but 30, each flipped
  after[flips] = 1 - before[flips]
  diff = stats.paired_difference(after, before)
  assert diff["difference"] == pytest.approx(after.mean() - before.mean())
  lo, hi = diff["ci95"]
  assert lo <= diff["difference"] <= hi
  apart = stats.interval(before)
  assert hi - lo < 0.5 * (apart[1] - apart[0])
  with pytest.raises(ValueError, match="same examples"):
    stats.paired_difference(after[:10], before)


@pytest.mark.parametrize("ci, verdict", [((0.01, 0.05), "improved"), ((-0.015, 0.01), "held"),
                                         ((-0.05, -0.03), "dropped"), ((-0.04, 0.01), "undecided"),
                                         ((-0.03, -0.001), "dropped")])
def test_verdicts_read_the_interval_against_the_margin(ci, verdict):
  assert stats.verdict(ci, margin=0.02) == verdict


def test_compare_pairs_the_same_answers_and_flips_lower_is_better_scores():
  records = [0, 0, 1, 2, 3, 4, 5, 6]
  evaluation = lambda spurious: {
      "val_understanding": {
          "per_answer": {
              "record": records,
              "accuracy": [1, 0, 1, 0, 1, 0, 1, 1],
              "spurious_prompt_rate": [spurious] * 8
          }
      }
  }
  before = evaluation(0)
  after = {**evaluation(1), "val_text": {"loss": 1.0}}
  compared = compare.compare(after, before, margin=0.02)
  assert set(compared) == {"val_understanding"}
  # The same answers on 7 records: nothing changed, but 7 records cannot rule out a drop
  # shown by fewer than 3 in 7 of all records (the rule of three).
  assert compared["val_understanding"]["accuracy"] == {
      "difference": 0.0,
      "ci95": [-3 / 7, 3 / 7],
      "verdict": "undecided"
  }
  # Every answer now holds a spurious prompt: a rise in a lower-is-better score is a drop.
  assert compared["val_understanding"]["spurious_prompt_rate"]["verdict"] == "dropped"
  # Different answers (another validation set) are not compared.
  after["val_understanding"]["per_answer"]["record"] = [0, 1, 2, 3, 4, 5, 6, 7]
  assert compare.compare(after, before, margin=0.02) == {}


def test_a_handful_of_answers_is_undecided_and_a_large_unchanged_set_is_held():
  """Two evaluations that answer alike: the bootstrap alone gives [0, 0] at any size; the
  verdict says "held" only when the records are enough to rule out a drop past the margin."""
  for records, verdict in ((1, "undecided"), (20, "undecided"), (149, "undecided"), (151, "held")):
    same = {"val_understanding": {"per_answer": {"record": list(range(records)), "accuracy": [1.0] * records}}}
    diff = compare.compare(same, same, margin=0.02)["val_understanding"]["accuracy"]
    assert diff["difference"] == 0.0 and diff["verdict"] == verdict, (records, diff)
    assert diff["ci95"] == pytest.approx([-3 / records, 3 / records] if records > 3 else [-1.0, 1.0])


def test_a_score_of_a_few_answers_has_an_interval_as_wide_as_they_leave_it():
  # One right answer: [1.0, 1.0] by the bootstrap alone; the rule of three leaves [0, 1].
  assert stats.interval([1.0], bounds=(0.0, 1.0)) == (0.0, 1.0)
  assert stats.interval([1.0] * 30, bounds=(0.0, 1.0)) == pytest.approx((0.9, 1.0))
  # A large set's own spread is wider than 3/n: unchanged.
  values = np.random.default_rng(0).integers(0, 2, 2000).astype(float)
  assert stats.interval(values, bounds=(0.0, 1.0)) == stats.interval(values)
