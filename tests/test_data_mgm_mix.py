"""configs/data/mgm_mix.py builds from files laid out and named as the publishers ship them."""

import gzip
import json
import pathlib

import pytest

from mgjax import config_files
from mgjax.data import build, sample

REPO = pathlib.Path(__file__).resolve().parents[1]
OASST_REAL = REPO.parent / "shared/data/oasst/en_100_tree.jsonl"


@pytest.mark.skipif(
    not OASST_REAL.exists(), reason=f"real OpenAssistant trees not found at {OASST_REAL} "
    "(../shared/data sits beside the repo on dev machines and CI, not in a fresh clone)")
def test_mgm_mix_config_builds_with_its_mixing_targets(tmp_path):
  root = tmp_path / "downloads"
  (root / "lima").mkdir(parents=True)
  (root / "oasst2").mkdir()
  (root / "MiniGemini-Finetune/coco/train2017").mkdir(parents=True)
  # The real OpenAssistant trees, gzipped under oasst2's file name.
  (root / "oasst2/2023-11-05_oasst2_ready.trees.jsonl.gz").write_bytes(gzip.compress(OASST_REAL.read_bytes()))
  lima = [{
      "conversations": [f"Question {i} about topic {i * 31}?", f"Answer {i}: it depends on {i * 17}."],
      "source": "stackexchange"
  } for i in range(20)]
  (root / "lima/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lima))
  png = sample.draw([("circle", "red", "center")])
  (root / "MiniGemini-Finetune/coco/train2017/000000000001.jpg").write_bytes(png)
  mgm = [{
      "id": f"u{i}",
      "image": "coco/train2017/000000000001.jpg",
      "conversations": [{
          "from": "human",
          "value": f"<image>\nQuestion {i} about the picture?"
      }, {
          "from": "gpt",
          "value": f"Answer number {i}."
      }]
  } for i in range(12)]
  mgm += [{
      "id": f"g{i}",
      "conversations": [{
          "from": "human",
          "value": f"Draw scene {i} with {i + 2} lanterns. <GEN>"
      }, {
          "from": "gpt",
          "value": f"<h>Scene {i}: {i + 2} paper lanterns glowing at dusk</h>"
      }]
  } for i in range(6)]
  (root / "MiniGemini-Finetune/minigemini_instruction.json").write_text(json.dumps(mgm))

  cfg = config_files.load_config_file(str(REPO / "configs/data/mgm_mix.py"))
  cfg.sources_root = str(root)
  cfg.num_workers = 1
  cfg.tokenizer = dict(train=True, vocab_size=400, path="")  # no LLM tokenizer on a test machine
  cfg.val_per_category = dict(understanding=2, generation=1, text=5)
  cfg.mixture.counts = dict(text=60, generation=10)
  dataset = build.build(cfg, str(tmp_path / "data"))

  card = json.loads(pathlib.Path(dataset.data_card).read_text())
  # drop_synthetic=True: 95 of the 100 real trees remain (5 have a synthetic root prompt).
  assert card["sources"]["oasst2"]["kept"] == 95
  assert card["sources"]["oasst2"]["rejected"] == {"dropped_message": 5}
  assert card["sources"]["lima"]["kept"] == 20 and card["sources"]["minigemini_instruction"]["kept"] == 18
  groups = card["mixing"]["groups"]
  assert groups["text"] == {"available": 110, "target": 60, "taken": 60, "factor": round(60 / 110, 4)}
  assert groups["generation"] == {"available": 5, "target": 10, "taken": 10, "factor": 2.0}
  assert groups["understanding"]["taken"] == 10 and groups["understanding"]["factor"] == 1.0
  assert dataset.splits == {
      "train": 80,
      "train_generation": 10,
      "val_understanding": 2,
      "val_generation": 1,
      "val_text": 5,
      "train_caption": 0,
      "val_caption": 0
  }
  assert "| text | 110 | 60 | 60 |" in (pathlib.Path(dataset.dataset_dir) / "data_card.md").read_text()
