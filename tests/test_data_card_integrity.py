"""data_card.json marks a finished build: written whole or not at all, and a damaged one is
named with the command that rebuilds it, not a bare JSONDecodeError on every run."""

import os
import shutil

import pytest

from conftest import tiny_config
from mgjax.data import datasets, shared_build


def test_a_damaged_data_card_is_named_with_the_rebuild_command(data_dir, tmp_path):
  recipe = tiny_config(1, data_dir).data.recipe
  shared_build.open_shared_build(recipe, data_dir)  # built once for the session
  copy = str(tmp_path / "data")
  shutil.copytree(data_dir, copy)
  folder = datasets.dataset_dir(recipe, copy)
  assert sorted(os.listdir(folder)).count("data_card.json") == 1
  assert not [f for f in os.listdir(folder) if f.startswith(".data_card")]  # no temporary left by the build
  card = (folder / "data_card.json").read_text()
  (folder / "data_card.json").write_text(card[:len(card) // 2])
  with pytest.raises(
      ValueError, match=rf"^{folder}/data_card.json is damaged \(JSONDecodeError: .*\)\. Rebuild the "
      rf"version: `python -m mgjax.data.build --config=<its data config> --data_dir={copy} --overwrite`"):
    datasets.load_built(recipe, copy)
