"""A full build of the tiny sample config, with bad records injected, read back split by split."""

import json
import os
import pathlib
import subprocess
import sys

import grain
import pytest

from mgjax import config_files
from mgjax.data import build, datasets, records

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_config():
  cfg = config_files.load_config_file(str(REPO / "configs/data/sample.py"), "tiny")
  return cfg


def _bad_sources(root: pathlib.Path) -> list[dict]:
  """Writes files mixing good records with bad ones; returns their source specs."""
  (root / "bad").mkdir(parents=True)
  (root / "bad/lima.jsonl").write_text("\n".join([
      json.dumps({"conversations": ["Good question?", "Good answer."]}),
      '{"conversations": [',  # line 2
      json.dumps({"conversations": []}),  # line 3
  ]) + "\n")
  (root / "bad/llava.json").write_text(
      json.dumps([
          {
              "id": "ok",
              "image": "shapes_00000.png",
              "conversations": [{
                  "from": "human",
                  "value": "<image>\nHow many?"
              }, {
                  "from": "gpt",
                  "value": "One."
              }]
          },
          {
              "id": "gone",
              "image": "no_such.png",
              "conversations": [{
                  "from": "human",
                  "value": "<image>\nQ"
              }, {
                  "from": "gpt",
                  "value": "A"
              }]
          },
      ]))
  # Mostly bad on purpose: min_kept_share=0 lets these sources keep what they can.
  return [
      dict(name="bad_lima", format="lima", path="bad/lima.jsonl", min_kept_share=0),
      dict(name="bad_llava", format="llava_json", path="bad/llava.json", image_root="images", min_kept_share=0)
  ]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  cfg = _tiny_config()
  # The bad files sit beside the generated sample files (relative paths resolve there);
  # writing them first is fine since sample generation only writes its own files.
  cfg.sources = list(cfg.sources) + _bad_sources(data_dir / cfg.sample.dir)
  return cfg, build.ensure_built(cfg, str(data_dir))


def _read_split(dataset, split):
  source = datasets.open_split(dataset, split)
  ds = grain.MapDataset.source(source)
  return [ds[i] for i in range(len(ds))]


def test_splits_read_back_with_the_documented_types(built):
  cfg, dataset = built
  splits = {s: _read_split(dataset, s) for s in records.SPLITS}
  assert {s: len(v) for s, v in splits.items()} == dataset.splits
  assert dataset.splits["val_understanding"] == dataset.splits["val_generation"] == dataset.splits["val_text"] == 8
  # tiny: 96 + 64 + 64 sample records (tree 13 of the 32 OASST trees is German), plus the
  # 2 good injected records, minus 3 x 8 held out.
  assert dataset.splits["train"] == (96 + 1) + 64 + (32 + 1 + 31) - 24
  # The 48 captions (pretraining's) are split apart, never mixed into train.
  assert dataset.splits["train_caption"] == 48 - 8 and dataset.splits["val_caption"] == 8
  ex = splits["val_understanding"][0]
  assert isinstance(ex["id"], bytes) and ex["category"] == b"understanding"
  assert ex["messages"]["role"][0] == b"user" and ex["messages"]["content"][0].startswith(b"<image>\n")
  assert len(ex["images"]) == 1 and ex["images"][0].startswith(b"\x89PNG")
  for split, examples in splits.items():
    if split.startswith("val_"):
      assert {e["category"].decode() for e in examples} == {split[4:]}


def test_train_generation_is_the_generation_part_of_train_and_val_is_held_out(built):
  _, dataset = built
  ids = {s: [e["id"] for e in _read_split(dataset, s)] for s in records.SPLITS}
  train = {e["id"]: e["category"] for e in _read_split(dataset, "train")}
  assert set(ids["train_generation"]) == {i for i, c in train.items() if c == b"generation"}
  held_out = set(ids["val_understanding"]) | set(ids["val_generation"]) | set(ids["val_text"])
  assert not held_out & set(train)
  captions = {e["id"]: e["category"] for e in _read_split(dataset, "train_caption")}
  assert set(captions.values()) == {b"caption"} and not set(captions) & (set(train) | held_out)
  assert all(len(v) == len(set(v)) for v in ids.values())


def test_bad_records_are_reported_and_the_rest_is_built(built):
  _, dataset = built
  rejected = [json.loads(l) for l in pathlib.Path(dataset.rejected).read_text().splitlines()]
  by_source = {}
  for r in rejected:
    by_source.setdefault(r["source"], []).append((r["record"], r["kind"]))
  assert sorted(by_source["bad_lima"]) == [("line 2", "invalid_json"), ("line 3", "empty_conversation")]
  assert by_source["bad_llava"] == [("record 1 (id=gone)", "missing_image")]
  assert all(r["file"].endswith(("bad/lima.jsonl", "bad/llava.json", "oasst/trees.jsonl")) for r in rejected)
  card = json.loads(pathlib.Path(dataset.data_card).read_text())
  assert card["sources"]["bad_lima"] == {
      **card["sources"]["bad_lima"], "read": 3,
      "kept": 1,
      "rejected": {
          "empty_conversation": 1,
          "invalid_json": 1
      }
  }
  assert card["sources"]["bad_llava"]["rejected"] == {"missing_image": 1}
  assert card["sources"]["oasst"]["rejected"] == {"language": 1}
  for s in card["sources"].values():
    assert s["read"] == s["kept"] + sum(s["rejected"].values()) + s["duplicates"]
    assert s["duplicates"] == 0  # the sample generator writes no duplicates
  assert card["splits"] == dataset.splits
  all_ids = {e["id"] for s in ("train", "val_understanding", "val_text") for e in _read_split(dataset, s)}
  assert b"bad_lima:1" in all_ids and b"bad_llava:ok" in all_ids


def test_no_validation_record_is_a_near_duplicate_of_a_training_record(built):
  # Checked by exact Jaccard over every (val, train) pair, not by the LSH index the build used.
  from mgjax.data import dedup
  from mgjax.data.records import Record
  _, dataset = built

  def shingle_set(e):
    rec = Record(
        id="", source="", category="", images=list(e["images"]), messages=[{
            "role": r.decode(),
            "content": c.decode()
        } for r, c in zip(e["messages"]["role"], e["messages"]["content"])])
    return dedup.shingles(dedup.words(rec), 5, dedup.image_digest(rec))

  train = [shingle_set(e) for e in _read_split(dataset, "train")]
  for split in ("val_understanding", "val_generation", "val_text"):
    for e in _read_split(dataset, split):
      s = shingle_set(e)
      assert max(dedup.jaccard(s, t) for t in train) < 0.8, e["id"]


def test_ensure_built_reuses_and_refuses_a_different_config(built):
  cfg, dataset = built
  info = pathlib.Path(dataset.dataset_dir) / "dataset_info.json"
  before = info.stat().st_mtime_ns
  again = build.ensure_built(cfg, dataset.data_dir)
  assert again == dataset and info.stat().st_mtime_ns == before
  changed = _tiny_config()
  changed.sources = list(cfg.sources)
  changed.seed = 1
  with pytest.raises(datasets.ConfigChanged, match="different data config.*seed"):
    build.ensure_built(changed, dataset.data_dir)
  # Building it anyway is refused too: the build already there stays as it was.
  with pytest.raises(datasets.ConfigChanged,
                     match=r"differs in \['seed'\]\); refusing to overwrite it. Bump the data "):
    build.build(changed, dataset.data_dir)
  assert info.stat().st_mtime_ns == before
  assert datasets.load_built(cfg, dataset.data_dir) == dataset


def test_tokenizer_is_trained_on_train_text_and_loads(built):
  _, dataset = built
  from mgjax.data import chat_tokenizers
  tok = chat_tokenizers.load(dataset.tokenizer_dir)
  assert tok.convert_tokens_to_ids("<image>") == 3
  assert pathlib.Path(dataset.tokenizer_dir, "tokenizer.json").exists()


def test_a_data_dir_copied_elsewhere_opens_with_its_own_tokenizer(built, tmp_path):
  """A build copied to a bucket and mounted elsewhere reads the tokenizer beside it, not the
  one where it was built."""
  import shutil

  from mgjax.data import chat_tokenizers
  cfg, dataset = built
  moved = tmp_path / "mounted" / "data"
  shutil.copytree(dataset.data_dir, moved)
  there = datasets.load_built(cfg, str(moved))
  assert there.tokenizer_dir == str(moved / f"mgjax_instructions/{cfg.name}/{cfg.version}/tokenizer")
  assert there.splits == dataset.splits and there.dataset_dir.startswith(str(moved))
  assert len(chat_tokenizers.load(there.tokenizer_dir)) == len(chat_tokenizers.load(dataset.tokenizer_dir))


def test_build_is_deterministic(built, tmp_path):
  cfg, dataset = built
  _bad_sources(tmp_path / cfg.sample.dir)
  other = build.build(cfg, str(tmp_path))
  assert other.splits == dataset.splits
  for split in ("train", "val_text"):
    assert sorted(e["id"] for e in _read_split(other, split)) == sorted(e["id"] for e in _read_split(dataset, split))


def test_command_line(tmp_path):
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  proc = subprocess.run([
      sys.executable, "-m", "mgjax.data.build", f"--config={REPO}/configs/data/sample.py:tiny",
      f"--data_dir={tmp_path}", "--config.val_per_category.text=4"
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "val_text': 4" in proc.stdout
  version = config_files.preset("data", "sample:tiny").version
  assert (tmp_path / f"mgjax_instructions/sample_tiny/{version}/data_card.json").exists()
  assert (tmp_path / f"mgjax_instructions/sample_tiny/{version}/tokenizer/tokenizer.json").exists()


def test_spill_is_removed_after_the_build(built):
  cfg, dataset = built
  assert not (pathlib.Path(dataset.data_dir) / ".mgjax_spill").exists()


def test_beam_direct_runner_builds_the_same_dataset(built, tmp_path):
  """TFDS's Apache Beam path (here the DirectRunner; Dataflow at scale) gives the same
  splits, examples, rejections and card as the local process pool."""
  pytest.importorskip("apache_beam")
  cfg, local = built
  _bad_sources(tmp_path / cfg.sample.dir)
  beam = build.build(cfg, str(tmp_path), beam_runner="DirectRunner", beam_options=["--direct_num_workers=1"])
  assert beam.splits == local.splits
  for split, n in local.splits.items():
    if n:
      by_id = lambda d: sorted(_read_split(d, split), key=lambda e: e["id"])
      assert by_id(beam) == by_id(local), split
  read_rejected = lambda d: pathlib.Path(d.rejected).read_text().replace(d.data_dir, "DIR")
  assert read_rejected(beam) == read_rejected(local)
  beam_card, local_card = (json.loads(pathlib.Path(d.data_card).read_text()) for d in (beam, local))
  for c in (beam_card, local_card):
    for s in c["sources"].values():
      s.pop("path")
    c.pop("tokenizer"), c.pop("token_unit")  # paths under each data_dir
  assert beam_card == local_card
  assert not build.spill_dir(cfg, str(tmp_path)).exists()


def test_big_splits_are_written_in_several_shards(built, tmp_path, monkeypatch):
  """Shards are cut by size (here tiny), and a sharded split reads back whole, in order."""
  from mgjax.data import builder
  cfg, one_shard = built
  monkeypatch.setattr(builder, "_SHARD_BYTES", 50_000)
  _bad_sources(tmp_path / cfg.sample.dir)
  sharded = build.build(cfg, str(tmp_path))
  info = json.loads((pathlib.Path(sharded.dataset_dir) / "dataset_info.json").read_text())
  train = next(s for s in info["splits"] if s["name"] == "train")
  assert len(train["shardLengths"]) > 1 and sum(map(int, train["shardLengths"])) == sharded.splits["train"]
  assert [e["id"] for e in _read_split(sharded, "train")] == [e["id"] for e in _read_split(one_shard, "train")]


def test_data_card_counts_conversations_longer_than_a_training_length():
  from types import SimpleNamespace

  from mgjax.data import card

  words = {"a": "one two three", "b": "one two three four five six", "c": "one"}
  items = [SimpleNamespace(id=k, category="text", source="lima") for k in words]
  summary = card.summarize({
      "train": items[:2],
      "val_text": items[2:]
  }, None, lambda r: [{
      "role": "user",
      "content": words[r.id]
  }], seq_len=4)
  # Byte-level pre-tokens of the text: 3, 6 and 1.
  assert summary["tokens"]["train"]["text"]["max"] == 6
  assert summary["over_seq_len"] == {
      "train": {
          "4": 1,
          "512": 0,
          "1024": 0,
          "2048": 0,
          "4096": 0
      },
      "val_text": {
          "4": 0,
          "512": 0,
          "1024": 0,
          "2048": 0,
          "4096": 0
      }
  }


@pytest.mark.parametrize("step", ["build before training", "open"])
def test_training_refuses_a_gs_data_dir_naming_the_mount_to_use(step):
  from mgjax.data import shared_build
  call = build.build_if_missing if step == "build before training" else shared_build.open_shared_build
  with pytest.raises(
      shared_build.DatasetNotShared, match=r"array_record files, which open local paths only.*"
      r"`gcsfuse --implicit-dirs my-bucket /mnt/my-bucket`.*"
      r"--config.data.data_dir=/mnt/my-bucket/mixes/data$"):
    call(_tiny_config(), "gs://my-bucket/mixes/data")
