"""A recipe of your own, as the README's "Your own data" and "Reviewing the data" walk through
it: the template, a review file named by a relative path on a machine that does not have it
(a pod worker), and a recipe without captions asked to pretrain."""

import json
import pathlib
import re

import pytest

from conftest import REPO
from mgjax import config_files, train
from mgjax.data import build, datasets, verdicts

README = (pathlib.Path(REPO) / "README.md").read_text()


def _section(title: str) -> str:
  return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _recipe(name: str):
  """The tiny sample without its caption source, small enough to build in seconds."""
  cfg = config_files.load_config_file(str(pathlib.Path(REPO) / "configs/data/sample.py"), "tiny")
  cfg.name = name
  cfg.sample.update(n_understanding=24, n_generation=16, n_text=16, n_caption=0)
  cfg.sources = [s for s in cfg.sources if s.get("category") != "caption"]
  cfg.val_per_category = dict(understanding=4, generation=4, text=4)
  cfg.tokenizer.vocab_size = 300
  cfg.num_workers = 1
  return cfg


def test_own_data_template_names_a_review_file_and_the_review_rebuild_replaces_the_build():
  template = re.search(r"```python\n(# /home/me/my_mix.py.*?)```", _section("Your own data"), re.DOTALL).group(1)
  scope = {}
  exec(template, scope)  # noqa: S102  (the README's own example)
  c = scope["get_config"]()
  assert c.review == "" and verdicts.path(c) is None
  review = _section("Reviewing the data")
  rebuild = [line for line in review.splitlines() if line.startswith("python -m mgjax.data.build")]
  assert rebuild and all("--overwrite" in line or "--config.version=" in line for line in rebuild)


def test_a_relative_review_path_is_recognised_where_the_file_is_not(tmp_path, monkeypatch):
  here, worker, other = (tmp_path / d for d in ("here", "worker", "other"))
  for d in (here, worker, other):
    d.mkdir()
  line = {"id": "mgm_generation:gen_00003", "source": "mgm_generation", "verdict": "drop", "note": "off"}
  (here / "review.jsonl").write_text(json.dumps(line) + "\n")
  cfg = _recipe("own_relative_review")
  cfg.review = "review.jsonl"
  data_dir = str(tmp_path / "data")
  monkeypatch.chdir(here)
  dataset = build.build(cfg, data_dir)
  copy = pathlib.Path(dataset.dataset_dir) / verdicts.COPY
  assert copy.read_bytes() == (here / "review.jsonl").read_bytes()
  card = json.loads(pathlib.Path(dataset.data_card).read_text())
  assert card["review"]["applied"]["dropped"] == 1 and card["review"]["copy"] == "review.jsonl"

  # A pod worker: the recipe travelled, the review file did not. The build's copy stands in.
  monkeypatch.chdir(worker)
  again = datasets.load_built(cfg, data_dir)
  assert again is not None and again.dataset_dir == dataset.dataset_dir
  assert build.ensure_built(cfg, data_dir).splits == dataset.splits  # reused, not rebuilt

  # A machine whose review.jsonl says something else still sees the difference.
  monkeypatch.chdir(other)
  (other / "review.jsonl").write_text(json.dumps({**line, "verdict": "keep"}) + "\n")
  with pytest.raises(datasets.ConfigChanged, match=r"differs in \['review'\]"):
    datasets.load_built(cfg, data_dir)


def test_pretraining_a_recipe_without_captions_names_the_recipe_and_the_fix(tmp_path):
  c = config_files.load_config_file(str(pathlib.Path(REPO) / "configs/pretrain.py"), "data=sample:tiny")
  recipe = _recipe("own_no_captions")
  for key in ("name", "sample", "sources", "val_per_category", "tokenizer"):
    c.data.recipe[key] = recipe[key]
  c.data.data_dir = str(tmp_path / "data")
  c.data.batch_size = c.train.eval_batch_size = 8
  c.mesh.num_devices = 1
  build.build_if_missing(c.data.recipe, c.data.data_dir)
  with pytest.raises(ValueError) as e:
    train.run(c, str(tmp_path / "pretrain"))
  assert str(e.value) == (
      "data recipe 'own_no_captions' (version 1.4.0) has no train_caption records: pretraining trains on "
      "image-caption pairs, and the recipe names no source with category='caption' (add one, e.g. dict(name=..., "
      "format='llava_json', path=..., image_root=..., category='caption'), and bump its version), or start stage 1 "
      "from the LLM instead")
