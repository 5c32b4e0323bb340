"""The grain pipeline over the built tiny sample: what the model is fed and trained on."""

from __future__ import annotations

import os

import grain
import jax
import ml_collections
import numpy as np
import pytest
import transformers
from flax import nnx

from mgjax import config_files
from mgjax.data import build, datasets, pipeline
from mgjax.models import vlm
from mgjax.train_step import make_loss_fn
from mgjax.run_files import resolve_model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(data_dir):
  config = config_files.load_config_file(os.path.join(REPO, "configs", "stage1.py"), "data=sample:tiny")
  dataset = build.ensure_built(config.data.recipe, data_dir)  # conftest: built once a session
  tokenizer = transformers.AutoTokenizer.from_pretrained(dataset.tokenizer_dir)
  model_cfg = resolve_model_config(config.model, tokenizer)
  n = vlm.num_image_tokens(model_cfg)
  encoder = pipeline.make_encoder(tokenizer, config.data, model_cfg, n)
  return config, dataset, tokenizer, encoder, n


def find(source, category: bytes, with_images: bool):
  for i in range(len(source)):
    if source[i]["category"] == category and bool(len(source[i]["images"])) == with_images:
      return source[i]
  raise AssertionError(f"no {category} example")


def test_loss_only_on_assistant_tokens(setup):
  _, dataset, tokenizer, encoder, _ = setup
  example = find(datasets.open_split(dataset, "train"), b"text", with_images=False)
  out = encoder(example)
  answers = [
      c.decode() for r, c in zip(example["messages"]["role"], example["messages"]["content"]) if r == b"assistant"
  ]
  trained = tokenizer.decode(out["targets"][out["loss_mask"] > 0])
  # Exactly the assistant turns, each followed by its end-of-turn token; no user text.
  assert trained.replace(" ", "") == "".join(a + tokenizer.eos_token for a in answers).replace(" ", "")
  users = [c.decode() for r, c in zip(example["messages"]["role"], example["messages"]["content"]) if r == b"user"]
  assert all(u.replace(" ", "") not in trained.replace(" ", "") for u in users)
  # Targets are the inputs shifted by one; padding carries no loss.
  n = int(out["segment_ids"].sum())
  np.testing.assert_array_equal(out["targets"][:n - 1], out["input_ids"][1:n])
  assert not out["loss_mask"][n:].any()


def test_image_slot_expanded_and_pixels_for_both_towers(setup):
  config, dataset, tokenizer, encoder, n = setup
  example = find(datasets.open_split(dataset, "train"), b"understanding", with_images=True)
  out = encoder(example)
  image_id = tokenizer.convert_tokens_to_ids("<image>")
  positions = np.nonzero(out["input_ids"] == image_id)[0]
  assert len(positions) == n and np.all(np.diff(positions) == 1)  # one contiguous block
  assert not out["loss_mask"][positions].any()
  lowres, highres = config.model.vision_lowres.image_size, config.model.vision_highres.image_size
  assert out["images_lowres"].shape == (config.data.max_images, lowres, lowres, 3)
  assert out["images_highres"].shape == (config.data.max_images, highres, highres, 3)
  # Normalised pixels of a real drawing (white background, coloured shapes), not zeros.
  white = (1.0 - np.asarray(config.data.image_mean)) / np.asarray(config.data.image_std)
  np.testing.assert_allclose(np.median(out["images_highres"][0].reshape(-1, 3), axis=0), white, atol=1e-2)
  assert out["images_highres"][0].std() > 0.1


def test_text_only_example_has_empty_image_slots(setup):
  _, dataset, _, encoder, _ = setup
  out = encoder(find(datasets.open_split(dataset, "train"), b"generation", with_images=False))
  assert not out["images_lowres"].any() and not out["images_highres"].any()


def test_train_iterator_is_seeded_and_resumable(setup):
  _, dataset, _, encoder, _ = setup
  source = datasets.open_split(dataset, "train")

  def batches(it, k):
    return [next(it)["input_ids"] for _ in range(k)]

  first = batches(pipeline.train_iterator(source, encoder, batch_size=4, seed=1), 6)
  assert all(b.shape == (4, encoder.seq_len) for b in first)
  np.testing.assert_array_equal(first, batches(pipeline.train_iterator(source, encoder, batch_size=4, seed=1), 6))
  assert not np.array_equal(first, batches(pipeline.train_iterator(source, encoder, batch_size=4, seed=2), 6))

  it = pipeline.train_iterator(source, encoder, batch_size=4, seed=1)
  batches(it, 3)
  state = it.get_state()
  resumed = pipeline.train_iterator(source, encoder, batch_size=4, seed=1)
  resumed.set_state(state)
  np.testing.assert_array_equal(batches(resumed, 3), first[3:])


def test_eval_batches_cover_the_split_once(setup):
  _, dataset, _, encoder, _ = setup
  source = datasets.open_split(dataset, "val_text")
  batches = list(pipeline.eval_batches(source, encoder, batch_size=3))
  assert len(batches) == -(-len(source) // 3)
  rows = np.concatenate([b["segment_ids"].any(axis=1) for b in batches])
  assert rows.sum() == len(source)  # every record once; the rest is loss-free padding
  padding = np.concatenate([b["loss_mask"] for b in batches])[~rows]
  assert not padding.any()


def test_replay_draws_its_fraction_from_the_stage1_mix(setup):
  _, dataset, _, encoder, n = setup
  generation, mix = datasets.open_split(dataset, "train_generation"), datasets.open_split(dataset, "train")
  stream = pipeline.train_iterator(generation, encoder, batch_size=8, seed=0, replay_source=mix, replay_fraction=0.25)
  batches = [next(stream) for _ in range(16)]
  # Generation requests have no images; the replayed mix brings understanding examples that do.
  with_images = np.concatenate([(b["input_ids"] == encoder.image_token_id).any(1) for b in batches])
  share = float(with_images.mean())
  mix_share = sum(len(mix[i]["images"]) > 0 for i in range(len(mix))) / len(mix)
  assert 0.25 * mix_share * 0.5 < share < 0.25 * mix_share * 1.6, (share, mix_share)
  # Without replay, none.
  plain = pipeline.train_iterator(generation, encoder, batch_size=8, seed=0)
  assert not any((next(plain)["input_ids"] == encoder.image_token_id).any() for _ in range(8))
  # The position is part of the state a checkpoint saves: a restored stream continues identically.
  state = stream.get_state()
  expected = next(stream)
  again = pipeline.train_iterator(generation, encoder, batch_size=8, seed=0, replay_source=mix, replay_fraction=0.25)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["input_ids"], expected["input_ids"])


def test_packed_rows_give_the_same_per_token_loss(setup):
  config, dataset, tokenizer, _, n = setup
  data_cfg = config.data.to_dict()
  data_cfg.update(max_images=4)
  model_cfg = resolve_model_config(config.model, tokenizer)
  encoder = pipeline.make_encoder(tokenizer, ml_collections.ConfigDict(data_cfg), model_cfg, n)
  source = datasets.open_split(dataset, "train")
  examples = [source[i] for i in range(24)]
  rows = list(
      pipeline.pack(grain.MapDataset.source(examples).map(encoder.unpadded).to_iter_dataset(), encoder, num_bins=4))
  packed = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  unpacked = {k: np.stack([encoder(e)[k] for e in examples]) for k in packed}
  # Every conversation is in exactly one row, several to a row, images included.
  assert sum(len(set(r["segment_ids"][r["segment_ids"] > 0])) for r in rows) == len(examples) > len(rows)
  assert (packed["input_ids"] == encoder.image_token_id).sum() == (
      unpacked["input_ids"] == encoder.image_token_id).sum()
  assert max((r["input_ids"] == encoder.image_token_id).sum() // n for r in rows) >= 2
  efficiency = lambda b: float((b["segment_ids"] > 0).mean())
  assert efficiency(packed) > 2 * efficiency(unpacked)

  graphdef, params = nnx.split(vlm.MiniGemini(model_cfg, rngs=nnx.Rngs(0)))
  loss_fn = jax.jit(make_loss_fn(graphdef))
  packed_sum, packed_count = loss_fn(params, packed)
  unpacked_sum, unpacked_count = loss_fn(params, unpacked)
  assert float(packed_count) == float(unpacked_count) > 0
  np.testing.assert_allclose(
      float(packed_sum) / float(packed_count),
      float(unpacked_sum) / float(unpacked_count), rtol=1e-5)


def test_pad_to_square_keeps_what_the_centre_crop_would_cut(setup):
  """data.pad_to_square: a wide image is padded with the mean colour, not cropped, as
  Mini-Gemini's fine-tuning (image_aspect_ratio "pad") feeds it."""
  import io

  from PIL import Image

  from mgjax.data import images

  config, dataset, tokenizer, _, n = setup
  pixels = np.zeros((40, 120, 3), np.uint8)
  pixels[:, :20] = (255, 0, 0)  # a red band at the left edge: a centre crop cuts it away
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  example = dict(find(datasets.open_split(dataset, "train"), b"understanding", with_images=True))
  example["images"] = [buffer.getvalue()]
  model_cfg = resolve_model_config(config.model, tokenizer)
  padded_cfg = ml_collections.ConfigDict({**config.data.to_dict(), "pad_to_square": True})
  cropped = pipeline.make_encoder(tokenizer, config.data, model_cfg, n)._images(example, 1)
  padded = pipeline.make_encoder(tokenizer, padded_cfg, model_cfg, n)._images(example, 1)
  expected_low, expected_high = images.mgm_pair(Image.open(io.BytesIO(buffer.getvalue())),
                                                config.model.vision_lowres.image_size,
                                                config.model.vision_highres.image_size, pad_to_square=True)
  np.testing.assert_array_equal(padded["images_highres"][0], expected_high)
  np.testing.assert_array_equal(padded["images_lowres"][0], expected_low)
  red = lambda x: (x[..., 0] > 1.0) & (x[..., 1] < 0)  # normalised: red high, green low
  assert red(padded["images_highres"][0]).any() and not red(cropped["images_highres"][0]).any()


def _conversation(turns: list[tuple[str, str]], id_: str = "long") -> dict:
  """A text example as a built split holds it."""
  roles = [r for _ in turns for r in (b"user", b"assistant")]
  contents = [t.encode() for turn in turns for t in turn]
  return {"id": id_.encode(), "category": b"text", "messages": {"role": roles, "content": contents}, "images": []}


def _with(setup, **data_overrides) -> pipeline.ConversationEncoder:
  config, _, tokenizer, _, n = setup
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.update(data_overrides)
  return pipeline.make_encoder(tokenizer, data, resolve_model_config(config.model, tokenizer), n)


TURNS = [("what is one plus one", "two"), ("and two plus two", "four, of course"),
         ("and three plus three", "six, which is three times two")]


def test_a_conversation_longer_than_seq_len_per_truncation(setup):
  _, _, tokenizer, encoder, _ = setup
  example = _conversation(TURNS)
  length = encoder.length(example)
  assert length > 30  # three turns of the sample tokenizer's tokens, template included
  # Two tokens short: the last answer does not fit whole, so it is not trained on at all;
  # the first two answers are, whole (a plain cut would train on half of the third).
  cut = _with(setup, seq_len=length - 2).unpadded(example)
  trained = tokenizer.decode(cut["targets"][cut["loss_mask"] > 0]).replace(" ", "")
  assert trained == f"two{tokenizer.eos_token}four,ofcourse{tokenizer.eos_token}"
  assert len(cut["input_ids"]) < length - 2
  # Not even the first answer fits: cut at seq_len, as before.
  assert len(_with(setup, seq_len=8).unpadded(example)["input_ids"]) == 8
  # drop: left out (None), and what fits is kept as it is.
  dropping = _with(setup, seq_len=length - 2, truncation="drop")
  assert dropping(example) is None and dropping.unpadded(example) is None
  assert dropping(_conversation(TURNS[:1]))["segment_ids"].sum() == encoder.length(_conversation(TURNS[:1]))
  with pytest.raises(ValueError, match=f"example 'long' is {length} tokens long, more than data.seq_len={length - 2}"):
    _with(setup, seq_len=length - 2, truncation="error").unpadded(example)
  with pytest.raises(ValueError, match="data.truncation='cut': one of"):
    _with(setup, truncation="cut")


def test_startup_length_check_counts_warns_and_refuses(setup, capsys):
  _, _, _, encoder, _ = setup
  long, short = _conversation(TURNS), _conversation(TURNS[:1], "short")
  length = encoder.length(long)
  sources = {"train": [long, short, short, short], "val_text": [short]}
  config = _with(setup, seq_len=length - 2)
  data = ml_collections.ConfigDict({"truncation_warn": 0.2})
  report = pipeline.check_lengths(data, config, sources)
  assert report["train"] == {
      "examples": 4,
      "checked": 4,
      "over": 1,
      "fraction": 0.25,
      "p95_length": int(np.percentile([length] + [encoder.length(short)] * 3, 95)),
      "max_length": length,
      "median_excess": 2,
      "max_excess": 2
  }
  assert report["val_text"]["over"] == 0
  err = capsys.readouterr().err
  assert "more than data.truncation_warn=20% of the conversations of ['train'] are longer" in err
  assert f"train: 1 of 4 conversations (25.0%) are longer than data.seq_len={length - 2}" in err
  # Below the threshold: counted, no warning.
  pipeline.check_lengths(ml_collections.ConfigDict({"truncation_warn": 0.5}), config, sources)
  assert "warning" not in capsys.readouterr().err
  # A big split is estimated from evenly spaced examples (here the first and the last).
  sampled = pipeline.length_report({"train": [long, short, short, short, long]}, config, max_examples=2)
  assert sampled["train"]["checked"] == 2 and sampled["train"]["over"] == 2
  with pytest.raises(ValueError, match=r"data.truncation='error'.*\n  train: 1 of 4 conversations"):
    pipeline.check_lengths(data, _with(setup, seq_len=length - 2, truncation="error"), sources)


def test_drop_trains_on_exactly_the_conversations_that_fit(setup):
  _, dataset, _, encoder, _ = setup
  source = datasets.open_split(dataset, "train")
  lengths = [encoder.length(source[i]) for i in range(len(source))]
  seq_len = int(np.median(lengths))
  fitting = sorted(n for n in lengths if n <= seq_len)
  assert 0 < len(fitting) < len(lengths)
  dropping = _with(setup, seq_len=seq_len, truncation="drop")
  rows = pipeline.train_iterator(source, dropping, batch_size=1, seed=0)
  # The first epoch: every conversation that fits, whole, and none of the others.
  assert sorted(int(next(rows)["segment_ids"].sum()) for _ in fitting) == fitting
