"""metrics.jsonl survives what a kill or a full disk leaves: a torn last line."""

import json

from mgjax import metrics


def test_a_torn_last_line_is_skipped_and_repaired_on_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) for s in (1, 2, 3)]
  path.write_text("\n".join(lines) + '\n{"step": 4, "split": "tr')  # the kill came mid-write
  assert [r["step"] for r in metrics.read(str(tmp_path))] == [1, 2, 3]
  assert metrics.train_loss_at(str(tmp_path), 3) == 1.0 / 3

  # Resuming from step 2's checkpoint drops what came after it, torn line included.
  writer = metrics.MetricsWriter(str(tmp_path), resume_step=2)
  writer.write(3, "train", loss=0.25)
  writer.close()
  assert [json.loads(l) for l in path.read_text().splitlines()] == [{
      "step": 1,
      "split": "train",
      "loss": 1.0
  }, {
      "step": 2,
      "split": "train",
      "loss": 0.5
  }, {
      "step": 3,
      "split": "train",
      "loss": 0.25
  }]
