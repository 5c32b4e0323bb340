"""Scores beyond loss: token F1, answer normalisation, the chance baseline, the report files."""

import json

import numpy as np
import pytest
from PIL import Image

from mgjax import reports
from mgjax.evaluators import compare, decoding, text, understanding


def example(category, *turns, images=()):
  roles = ["user", "assistant"] * (len(turns) // 2)
  return {
      "category": category.encode(),
      "images": list(images),
      "messages": {
          "role": [r.encode() for r in roles],
          "content": [t.encode() for t in turns]
      }
  }


def test_token_f1_is_squad_style():
  assert text.token_f1("A red circle.", "a red circle") == 1.0
  # 2 of 3 predicted words are right, 2 of 4 reference words are found: P 2/3, R 1/2.
  assert text.token_f1("red blue circle", "a red circle here") == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
  assert text.token_f1("square", "circle") == 0.0
  assert text.token_f1("", "") == 1.0


def test_normalize_answer_ignores_case_punctuation_and_spacing():
  assert text.normalize_answer("  Two.  ") == "two"
  assert text.normalize_answer("The red one is a  Circle!") == "the red one is a circle"


def test_assistant_turns_give_each_answer_its_history_and_images():
  source = [example("understanding", "<image>\nHow many?", "Two.", "What colour?", "Red.", images=[b"png"])]
  items = list(decoding.assistant_turns(source))
  assert [ref for _, _, ref in items] == ["Two.", "Red."]
  assert [len(prefix) for prefix, _, _ in items] == [1, 3]
  assert all(images == [b"png"] for _, images, _ in items)


def test_chance_is_the_most_common_training_answer_per_question():
  train = [example("understanding", "<image>\nHow many shapes are there?", a) for a in ("Two.", "Two.", "One.")]
  train.append(example("text", "How many shapes are there?", "Ten."))  # not understanding: ignored
  majority = understanding.majority_answers(train)
  assert majority == {"how many shapes are there": ("two",)}


def test_chance_shares_credit_between_tied_answers_whatever_their_order():
  answers = ("Two.", "One.", "One.", "Two.", "Three.")
  for order in (answers, answers[::-1]):
    train = [example("understanding", "<image>\nHow many shapes are there?", a) for a in order]
    assert understanding.majority_answers(train) == {"how many shapes are there": ("one", "two")}
  majority = understanding.majority_answers(train)
  question = [{"role": "user", "content": "<image>\nHow many shapes are there?"}]
  # "one" is one of two tied answers (half a point), "three" is not a majority answer.
  assert understanding.chance([(question, "One."), (question, "Three.")], majority) == 0.25


def _report_data(acc: float = 0.89):
  scores = lambda acc, fmt: {
      "val_understanding": {
          "loss": 0.5,
          "accuracy": acc,
          "chance": 0.3
      },
      "val_generation": {
          "loss": 0.2,
          "format_rate": fmt,
          "prompt_f1": 0.8
      },
      "val_text": {
          "loss": 1.1
      }
  }
  data = {
      "stage": 2,
      "stage1": scores(0.9, 0.5),
      "stage2": scores(acc, 1.0),
      "complete": True,
      "result": {
          "step": 50,
          "checkpoint": "/w/checkpoints/50",
          "why": "last step"
      },
      "stopped": None,
      "drift": [{
          "step": 50,
          "changes": {
              "val_understanding": 0.02
          },
          "within_bounds": True
      }]
  }
  return data


def test_report_writes_json_markdown_and_a_png(tmp_path):
  data = _report_data()
  reports.write(str(tmp_path), data)
  assert json.loads((tmp_path / "report.json").read_text()) == data
  md = (tmp_path / "report.md").read_text()
  assert "| val_generation | format_rate | 0.500 | 1.000 |" in md
  assert "| val_understanding | accuracy | 0.900 | 0.890 |" in md
  assert "val_understanding +2.0%" in md and "![validation curves and scores](report.png)" in md
  with Image.open(tmp_path / "report.png") as png:
    assert png.format == "PNG" and png.width > 600
    assert np.asarray(png.convert("L")).std() > 10  # something was drawn


def test_a_report_written_part_way_leaves_no_report_json_and_no_half_file(tmp_path):
  """report.json marks a finished run, so it is written last, and each file whole or not at
  all: a write that fails (here report.md cannot take the place of a folder of that name)
  leaves the files as they were."""
  reports.write(str(tmp_path), _report_data(0.5))
  before = {f: (tmp_path / f).read_bytes() for f in ("report.json", "report.md", "report.png")}
  (tmp_path / "report.md").unlink()
  (tmp_path / "report.md").mkdir()
  with pytest.raises(OSError):
    reports.write(str(tmp_path), _report_data(0.9))
  assert (tmp_path / "report.json").read_bytes() == before["report.json"]  # still the old, whole one
  with Image.open(tmp_path / "report.png") as png:
    png.load()  # whole: a PNG cut short does not decode
  assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md", "report.png"]  # no temp left

  (tmp_path / "report.md").rmdir()
  (tmp_path / "report.json").unlink()
  reports.write(str(tmp_path), _report_data(0.9))
  assert reports.read(str(tmp_path)) == _report_data(0.9)


@pytest.mark.parametrize("text", ['{"stage": 2, "stage1": {"val_te', "", "[1, 2]", '{"complete": true}', "\xff\xfe"])
def test_a_damaged_report_json_is_named_with_what_to_run(tmp_path, text):
  (tmp_path / "report.json").write_bytes(text.encode("latin-1"))
  with pytest.raises(
      reports.ReportDamaged, match=rf"^{tmp_path}/report.json is damaged \(.*\)\. Run that stage's "
      rf"command again with --workdir={tmp_path}: it rebuilds the report from the run's checkpoints"):
    reports.read(str(tmp_path))


def test_scores_of_a_split_without_answers_are_absent_not_nan():
  scores = decoding.with_intervals({"accuracy": []}, [])
  assert scores == {"num_answers": 0, "per_answer": {"record": [], "accuracy": []}}
  assert compare.compare({"v": scores}, {"v": scores}, margin=0.02) == {}


@pytest.mark.parametrize("lo, hi", [(4.37, 6.92), (6.70, 6.97), (0.052, 3.1), (2.0, 2.0)])
def test_report_chart_labels_the_loss_axis_with_plain_numbers_inside_the_losses_range(lo, hi):
  """report.png's log-scale loss axis: a handful of ticks where the losses are, not powers of ten."""
  ticks = reports.loss_ticks(lo, hi)
  inside = [t for t in ticks if lo * 0.99 <= t <= hi * 1.01]
  assert len(inside) >= (1 if lo == hi else 3), ticks
  assert all(len(f"{t:g}") <= 5 for t in ticks), ticks  # 4.4, 6.75, 0.052: no 10^0 notation
