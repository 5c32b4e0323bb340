"""Decoding: the KV cache against full recomputation, padding, sharding, sampling, text level.

A tiny randomly initialised MiniGemini (configs/models/sample.py): its logits are near
uniform, but the argmax still depends on every input, which is all these tests need.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from mgjax import base_config, config_files
from mgjax import decode
from mgjax.data import pipeline, tokenizer_training
from mgjax.data.templates import IMAGE
from mgjax.models import DEFAULT_LOGICAL_AXIS_RULES, MiniGemini, logical_shardings, num_image_tokens
from mgjax.models.llm import DecoderLM, stack_layers

TEXTS = [
    "Draw a red circle on a white background. <GEN>", "<h>A flat red circle.</h>", "What is 2 + 3? 2 + 3 = 5.",
    "Is there a blue square? Yes.", "How many triangles? Two."
]
EOS = 2  # the sample tokenizer's </s>


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tokenizer_training.train_sample_tokenizer(TEXTS, str(tmp_path_factory.mktemp("tok")), vocab_size=300)


@pytest.fixture(scope="module")
def model_cfg(tokenizer):
  cfg = config_files.preset("models", "sample")
  cfg.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
  return cfg


@pytest.fixture(scope="module")
def model(model_cfg):
  return nnx.split(MiniGemini(model_cfg, rngs=nnx.Rngs(0)))


def _images(key, num_rows, num_images):
  k1, k2 = jax.random.split(key)
  return (np.asarray(jax.random.normal(k1, (num_rows, num_images, 32, 32, 3))),
          np.asarray(jax.random.normal(k2, (num_rows, num_images, 64, 64, 3))))


def _prompts(model_cfg, lengths, *, image_rows=(), seed=0):
  """Random prompts of the given lengths; rows in image_rows start with one image."""
  rng = np.random.default_rng(seed)
  n = num_image_tokens(model_cfg)
  num_images = 1 if image_rows else 0
  lowres, highres = _images(jax.random.key(seed), len(lengths), num_images)
  prompts = []
  for row, length in enumerate(lengths):
    ids = rng.integers(10, model_cfg.vocab_size, length).astype(np.int32)
    if row in image_rows:
      ids = np.concatenate([ids[:1], np.full(n, model_cfg.image_token_id, np.int32), ids[1:]])
    prompts.append({"input_ids": ids, "images_lowres": lowres[row], "images_highres": highres[row]})
  return prompts


def test_extend_logits_equal_the_full_forward():
  llm = DecoderLM(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp=64, rngs=nnx.Rngs(0))
  ids = np.asarray(jax.random.randint(jax.random.key(1), (2, 10), 0, 64))
  lengths = (4, 7)  # row 0 has 3 columns of left padding
  mask = np.arange(7)[None] >= 7 - np.array(lengths)[:, None]
  prompt = np.where(mask, ids[:, :7], 0)
  extend = nnx.jit(lambda llm, ids, mask, cache: llm.extend(ids, token_mask=mask, cache=cache))
  cache = llm.init_cache(2, 10)
  logits, cache = extend(llm, prompt, mask, cache)
  steps = [logits[:, -1]]
  for t in range(7, 10):
    logits, cache = extend(llm, ids[:, t:t + 1], None, cache)
    steps.append(logits[:, 0])
  assert int(cache["index"]) == 10
  np.testing.assert_array_equal(cache["length"], [4 + 3, 7 + 3])
  for row, n in enumerate(lengths):
    sequence = np.concatenate([prompt[row, 7 - n:], ids[row, 7:]])[None]
    full = nnx.jit(lambda llm, ids: llm(ids))(llm, sequence)[0]
    for step, got in enumerate(steps):
      np.testing.assert_allclose(got[row], full[n - 1 + step], atol=1e-5, rtol=0)


def _tiny_llm(*, scan_layers: bool = False, attention_kernel: str = "auto", family: str = "llama") -> DecoderLM:
  """A tiny decoder; the scanned one has the unscanned one's weights, stacked."""
  experts = dict(num_experts=4, experts_per_token=2) if family == "mixtral" else {}

  def make(scan, seed):
    return DecoderLM(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp=64, scan_layers=scan,
                     attention_kernel=attention_kernel, family=family, rngs=nnx.Rngs(seed), **experts)

  llm = make(False, 0)
  if not scan_layers:
    return llm
  graphdef, state = nnx.split(make(True, 1))
  nnx.replace_by_pure_dict(state, stack_layers(nnx.to_pure_dict(nnx.state(llm))))
  return nnx.merge(graphdef, state)


def _layers_kv(cache):
  """A cache's keys and values as one [B, S, K, D] pair per layer, scanned or not."""
  kv = cache["layers"]
  if isinstance(kv, dict):
    return [{"k": kv["k"][i], "v": kv["v"][i]} for i in range(kv["k"].shape[0])]
  return kv


def _greedy_steps(llm, logits, cache, steps):
  """Greedy tokens [B, steps] from prefill logits [B, vocab], one extend a token."""
  step = nnx.jit(lambda llm, tokens, cache: llm.extend(tokens[:, None], cache=cache))
  tokens = [jnp.argmax(logits, axis=-1)]
  for _ in range(steps - 1):
    logits, cache = step(llm, tokens[-1], cache)
    tokens.append(jnp.argmax(logits[:, 0], axis=-1))
  return np.stack([np.asarray(t) for t in tokens], axis=1)


# (scan_layers, model.attention, family): the splash case runs Pallas' interpreter on the CPU,
# the cudnn one must fall back (cuDNN's sequence lengths cannot serve left padding), the
# mixtral one routes every token to its experts.
@pytest.mark.parametrize("scan_layers, kernel, family", [(False, "auto", "llama"), (True, "auto", "llama"),
                                                         (False, "cudnn", "llama"), (True, "splash", "llama"),
                                                         (True, "auto", "mixtral")])
def test_prefill_fills_the_cache_as_extend_does(scan_layers, kernel, family):
  """DecoderLM.prefill (training's attention, last-column logits) against extend on a fresh
  cache (a dense [B, T, S] mask, every column's logits) and the no-cache forward of each row."""
  llm = _tiny_llm(scan_layers=scan_layers, attention_kernel=kernel, family=family)
  t, steps = 128, 4  # 128: a length splash's blocks tile
  size = t + steps
  lengths = np.array([37, 128, 90, 1])
  ids = np.asarray(jax.random.randint(jax.random.key(2), (4, t), 3, 64))
  mask = np.arange(t)[None] >= t - lengths[:, None]
  prompt = np.where(mask, ids, 0)
  prefill = nnx.jit(lambda llm, ids, mask: llm.prefill(ids, token_mask=mask, cache_size=size))
  logits, cache = prefill(llm, prompt, mask)
  extend = nnx.jit(lambda llm, ids, mask, cache: llm.extend(ids, token_mask=mask, cache=cache))
  all_logits, expected = extend(llm, prompt, mask, llm.init_cache(4, size))

  assert logits.shape == (4, 64) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, all_logits[:, -1], atol=1e-5, rtol=0)
  assert int(cache["index"]) == int(expected["index"]) == t
  np.testing.assert_array_equal(cache["valid"], expected["valid"])
  np.testing.assert_array_equal(cache["length"], lengths)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), cache) == jax.tree.map(lambda x: (x.shape, x.dtype), expected)
  for layer, (got, want) in enumerate(zip(_layers_kv(cache), _layers_kv(expected))):
    for name in ("k", "v"):
      # Keys and values of the real tokens in the same slots; padding slots are never read.
      np.testing.assert_allclose(
          np.asarray(got[name])[:, :t][mask],
          np.asarray(want[name])[:, :t][mask], atol=1e-5, rtol=0, err_msg=f"layer {layer} {name}")
      assert not np.asarray(got[name])[:, t:].any(), "slots after the prompt stay empty"

  # Decoding continues from either cache with the same tokens, which are the greedy tokens of
  # the no-cache forward over prompt and tokens (as decode._full_forward runs it, with the
  # xla kernel: cuDNN's needs a GPU).
  tokens = _greedy_steps(llm, logits, cache, steps)
  np.testing.assert_array_equal(tokens, _greedy_steps(llm, all_logits[:, -1], expected, steps))
  sequence = np.concatenate([prompt, tokens[:, :-1]], axis=1)
  real = np.concatenate([mask, np.ones((4, steps - 1), bool)], axis=1)
  full = nnx.jit(lambda llm, ids, positions, segments: llm(ids, positions=positions, segment_ids=segments))(
      _tiny_llm(family=family), sequence, np.maximum(np.cumsum(real, axis=1) - 1, 0), real.astype(np.int32))
  np.testing.assert_allclose(logits, full[:, t - 1], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(tokens, np.argmax(full[:, t - 1:], axis=-1))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_prefill_on_a_mesh_equals_one_device(scan_layers):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 virtual CPU devices"
  llm = _tiny_llm(scan_layers=scan_layers)
  lengths = np.array([5, 12, 9, 1])
  ids = np.asarray(jax.random.randint(jax.random.key(3), (4, 12), 3, 64))
  mask = np.arange(12)[None] >= 12 - lengths[:, None]
  prefill = nnx.jit(lambda llm, ids, mask: llm.prefill(ids, token_mask=mask, cache_size=16))
  logits, cache = prefill(llm, ids, mask)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  graphdef, state = nnx.split(llm)
  sharded = nnx.merge(graphdef, jax.device_put(state, logical_shardings(state, mesh)))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
    on_mesh, mesh_cache = prefill(sharded, ids, mask)
  np.testing.assert_allclose(on_mesh, logits, atol=1e-5, rtol=0)
  for got, want in zip(jax.tree.leaves(mesh_cache), jax.tree.leaves(cache)):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=1e-5, rtol=0)
  # The cache is split over the batch and the kv heads, as extend splits it.
  expected = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  assert _layers_kv(mesh_cache)[0]["k"].sharding.is_equivalent_to(expected, 4)
  assert mesh_cache["valid"].sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None)), 2)


@pytest.mark.parametrize("with_images", [False, True])
def test_cached_greedy_equals_recomputing_everything(model, model_cfg, with_images):
  graphdef, params = model
  # Three prompt lengths in one left-padded batch; with images, row 1 stays text-only.
  prompts = _prompts(model_cfg, (5, 11, 8), image_rows=(0, 2) if with_images else ())
  batch = decode.left_pad(prompts, pad_id=0)
  cached = decode.generate(graphdef, params, batch, max_new_tokens=6, eos_id=EOS)
  recomputed = decode.generate(graphdef, params, batch, max_new_tokens=6, eos_id=EOS, use_cache=False)
  np.testing.assert_array_equal(cached, recomputed)
  assert cached.shape == (3, 6)
  assert len({tuple(row) for row in cached}) == 3  # rows really differ: the prompts matter


def test_images_change_the_answer(model, model_cfg):
  graphdef, params = model
  prompts = _prompts(model_cfg, (6, 6), image_rows=(0, 1))
  prompts[1] = {**prompts[1], "input_ids": prompts[0]["input_ids"]}  # same text, other image
  tokens = decode.generate(graphdef, params, decode.left_pad(prompts, pad_id=0), max_new_tokens=6, eos_id=EOS)
  assert not np.array_equal(tokens[0], tokens[1])


def test_left_padding_does_not_change_a_row(model, model_cfg):
  graphdef, params = model
  prompts = _prompts(model_cfg, (4, 13, 9), image_rows=(1,), seed=3)
  batched = decode.generate(graphdef, params, decode.left_pad(prompts, pad_id=0, length=32, batch_size=4),
                            max_new_tokens=6, eos_id=EOS)
  for row, prompt in enumerate(prompts[:2]):  # the most padded row, and one with an image
    alone = decode.generate(graphdef, params, decode.left_pad([prompt], pad_id=0), max_new_tokens=6, eos_id=EOS)
    np.testing.assert_array_equal(batched[row], alone[0], err_msg=f"row {row}")


def test_sharded_decoding_equals_single_device(model, model_cfg):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 virtual CPU devices"
  graphdef, params = model
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  sharded = jax.device_put(params, logical_shardings(params, mesh))
  prompts = _prompts(model_cfg, (5, 11, 8, 3), image_rows=(0, 3), seed=1)
  batch = decode.left_pad(prompts, pad_id=0)
  single = decode.generate(graphdef, params, batch, max_new_tokens=6, eos_id=EOS)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
    on_mesh = decode.generate(graphdef, sharded, batch, max_new_tokens=6, eos_id=EOS)
    _, cache = decode._prefill(graphdef, sharded, batch, cache_size=batch["input_ids"].shape[1] + 6)
  np.testing.assert_array_equal(on_mesh, single)
  # The cache is split over the batch and the kv heads, as the activations are.
  expected = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  assert cache["layers"][0]["k"].sharding.is_equivalent_to(expected, 4)


def test_a_scanned_decoder_decodes_as_its_layers_one_by_one(model, model_cfg):
  """The mgm presets scan their decoder (one stacked layer, model.llm.scan_layers): on the CPU
  decoding unstacks it (decode._layers_unstacked), elsewhere it keeps the scan. Both give the
  tokens of the same weights as separate layers, greedy and sampled, on one device and a mesh."""
  graphdef, params = model
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  cfg.llm.scan_layers = True
  scanned_def, scanned = nnx.split(MiniGemini(cfg, rngs=nnx.Rngs(1)))
  weights = nnx.to_pure_dict(params)
  nnx.replace_by_pure_dict(scanned, {**weights, "llm": stack_layers(weights["llm"])})
  batch = decode.left_pad(_prompts(model_cfg, (5, 11, 8), image_rows=(1,), seed=4), pad_id=0)
  settings = dict(max_new_tokens=6, eos_id=EOS, pad_id=0, num_tokens=None)
  for sampling in (dict(temperature=0.0, top_k=0, top_p=1.0), dict(temperature=1.0, top_k=20, top_p=0.9)):
    expected = decode.generate(graphdef, params, batch, **settings, **sampling)
    for unstack in (True, False):
      tokens = decode._generate_cached(scanned_def, scanned, batch, jax.random.key(0), np.int32(EOS), np.int32(0),
                                       max_new_tokens=6, num_tokens=None, unstack_layers=unstack, **sampling)
      np.testing.assert_array_equal(tokens, expected, err_msg=f"{sampling}, unstack_layers={unstack}")
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
    on_mesh = decode.generate(scanned_def, jax.device_put(scanned, logical_shardings(scanned, mesh)), batch, **settings)
  np.testing.assert_array_equal(on_mesh, decode.generate(graphdef, params, batch, **settings))


def test_a_row_stops_at_eos_and_the_loop_ends_when_all_have(model, model_cfg):
  graphdef, params = model
  batch = decode.left_pad(_prompts(model_cfg, (5, 11, 8), seed=2), pad_id=0)
  free = decode.generate(graphdef, params, batch, max_new_tokens=6, eos_id=-1)
  eos = int(free[0, 2])  # pretend row 0's third token ends a turn
  tokens = decode.generate(graphdef, params, batch, max_new_tokens=6, eos_id=eos, pad_id=-7)
  for row in range(3):
    hits = np.nonzero(free[row] == eos)[0]
    end = int(hits[0]) + 1 if len(hits) else 6
    np.testing.assert_array_equal(tokens[row, :end], free[row, :end])
    assert (tokens[row, end:] == -7).all()
  # Every row finished at its first token: nothing else is generated.
  first = decode.generate(graphdef, params, batch, max_new_tokens=6, eos_id=-1)[:, 0]
  if len(set(first.tolist())) == 1:
    stopped = decode.generate(graphdef, params, batch, max_new_tokens=6, eos_id=int(first[0]), pad_id=-7)
    assert (stopped[:, 1:] == -7).all()


def test_sampling_is_reproducible_and_differs_from_greedy(model, model_cfg):
  graphdef, params = model
  batch = decode.left_pad(_prompts(model_cfg, (5, 11, 8)), pad_id=0)
  greedy = decode.generate(graphdef, params, batch, max_new_tokens=6, eos_id=EOS)

  def sample(seed, **settings):
    return decode.generate(graphdef, params, batch, max_new_tokens=6, eos_id=EOS, temperature=1.0,
                           rng=jax.random.key(seed), **settings)

  np.testing.assert_array_equal(sample(0), sample(0))
  assert not np.array_equal(sample(0), sample(1))
  assert not np.array_equal(sample(0), greedy)
  # Restricted to the single most likely token, sampling is greedy decoding.
  np.testing.assert_array_equal(sample(0, top_k=1), greedy)
  np.testing.assert_array_equal(sample(0, top_p=1e-6), greedy)


def test_top_k_and_top_p_restrict_the_support():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))

  def support(**settings):
    return set(np.asarray(decode.sample_tokens(logits, jax.random.key(0), temperature=1.0, **settings)).tolist())

  assert support() == {0, 1, 2, 3}
  assert support(top_k=2) == {0, 1}
  assert support(top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
  assert support(top_p=0.85) == {0, 1, 2}
  assert support(top_k=3, top_p=0.5) == {0}
  # A tie at the k-th largest keeps every tied token, and top-p counts the probability of all of
  # them: 0.4, 0.3, 0.3 renormalised, 0.4 < 0.5 so the 0.3s are kept too.
  tied = jnp.log(jnp.array([[0.4, 0.3, 0.3]] * 2000))
  assert set(np.asarray(decode.sample_tokens(tied, jax.random.key(0), temperature=1.0, top_k=2,
                                             top_p=0.5)).tolist()) == {0, 1, 2}
  assert set(np.asarray(decode.sample_tokens(logits, None)).tolist()) == {0}  # greedy


def test_image_token_is_never_generated(model, model_cfg):
  graphdef, params = model
  batch = decode.left_pad(_prompts(model_cfg, (5, 11, 8)), pad_id=0)
  greedy = decode.generate(graphdef, params, batch, max_new_tokens=1, eos_id=EOS)[:, 0]
  # Give <image> a scaled copy of a favourite's output weights: it now wins every row.
  boosted = nnx.to_pure_dict(params)
  kernel = np.array(boosted["llm"]["lm_head"]["kernel"])
  kernel[:, model_cfg.image_token_id] = 3.0 * kernel[:, greedy[0]]
  boosted["llm"]["lm_head"]["kernel"] = kernel
  model = nnx.merge(graphdef, boosted)
  mask = batch["prompt_mask"]
  logits = model(batch["input_ids"], batch["images_lowres"], batch["images_highres"],
                 positions=np.maximum(np.cumsum(mask, axis=1) - 1, 0), segment_ids=mask.astype(np.int32))
  assert np.asarray(logits[:, -1]).argmax(-1)[0] == model_cfg.image_token_id
  tokens = decode.generate(graphdef, boosted, batch, max_new_tokens=3, eos_id=EOS)
  assert model_cfg.image_token_id not in tokens
  assert tokens[0, 0] == greedy[0]  # the runner-up


# ------------------------------------------------------------------------------ Text level


@pytest.fixture(scope="module")
def generator(model, model_cfg, tokenizer):
  data_cfg = base_config.base_config().data
  encoder = pipeline.make_encoder(tokenizer, data_cfg, model_cfg, num_image_tokens(model_cfg))
  return decode.Generator(*model, tokenizer, encoder, max_batch_size=4)


def _png(colour) -> bytes:
  out = io.BytesIO()
  Image.new("RGB", (48, 40), colour).save(out, format="PNG")
  return out.getvalue()


def test_encode_prompt_is_the_training_encoding_up_to_the_answer(generator, tokenizer):
  encoder = generator.encoder
  messages = [{
      "role": "user",
      "content": f"{IMAGE}\nIs there a blue square?"
  }, {
      "role": "assistant",
      "content": "Yes."
  }]
  image = _png("blue")
  prompt = encoder.encode_prompt(messages[:1], [image])
  trained = encoder({
      "messages": {
          "role": [m["role"] for m in messages],
          "content": [m["content"] for m in messages]
      },
      "images": [image]
  })
  n = len(prompt["input_ids"])
  np.testing.assert_array_equal(prompt["input_ids"], trained["input_ids"][:n])
  assert tokenizer.decode(prompt["input_ids"][-1:]) == "<|assistant|>"
  assert (prompt["input_ids"] == encoder.image_token_id).sum() == encoder.num_image_tokens
  np.testing.assert_array_equal(prompt["images_lowres"], trained["images_lowres"])
  np.testing.assert_array_equal(prompt["images_highres"], trained["images_highres"])
  with pytest.raises(ValueError, match="1 <image> placeholder"):
    encoder.encode_prompt(messages[:1], [])


def test_generator_batches_like_single_prompts_and_cuts_at_stop(generator):
  conversations = [[{
      "role": "user",
      "content": "What is 2 + 3?"
  }], [{
      "role": "user",
      "content": f"{IMAGE}\nIs there a blue square?"
  }], [{
      "role": "user",
      "content": "Draw a red circle. <GEN>"
  }],
                   [{
                       "role": "user",
                       "content": "hi"
                   }, {
                       "role": "assistant",
                       "content": "Yes."
                   }, {
                       "role": "user",
                       "content": "How many triangles?"
                   }], [{
                       "role": "user",
                       "content": f"{IMAGE}\nHow many?"
                   }]]
  images = [[], [_png("blue")], [], [], [_png("red")]]
  # Five prompts: a full batch of 4, then one padded up to a bucket.
  answers = generator.generate(conversations, images, max_new_tokens=8)
  assert len(answers) == 5 and all(isinstance(a, str) for a in answers)
  for conversation, files, answer in zip(conversations, images, answers):
    assert generator.generate([conversation], [files], max_new_tokens=8) == [answer]
  assert answers[1] != answers[4]  # different images, different answers

  longest = max(range(5), key=lambda i: len(answers[i]))
  answer = answers[longest]
  assert len(answer) >= 4, answers
  stop = answer[len(answer) // 2:len(answer) // 2 + 2]
  cut = generator.generate([conversations[longest]], [images[longest]], max_new_tokens=8, stop=["never appears", stop])
  assert cut == [answer[:answer.index(stop)]]

  # Every generated id is one the tokenizer knows (the model's vocabulary is larger).
  tokens = decode.generate(generator.graphdef, generator.params,
                           decode.left_pad([generator.encoder.encode_prompt(conversations[0])], pad_id=0),
                           max_new_tokens=8, eos_id=EOS, temperature=50.0, num_tokens=len(generator.tokenizer))
  assert tokens.max() < len(generator.tokenizer) < 1024


def test_truncate_at_stop():
  assert decode.truncate_at_stop("a.b!c", [".", "!"]) == "a"
  assert decode.truncate_at_stop("a.b!c", ["!", "."]) == "a"  # the earliest, whatever the order
  assert decode.truncate_at_stop("abc", ["x", ""]) == "abc"
  assert decode.truncate_at_stop("abc", []) == "abc"


@pytest.mark.parametrize("answer, prompt", [
    ("<h>A red circle.</h>", "A red circle."),
    ("Sure! <h> two blue squares </h> there.", "two blue squares"),
    ("<h>first</h> and <h>second</h>", "first"),
    ("no tags at all", None),
    ("<h>never closed", None),
    ("closed first</h><h>then opened", None),
    ("<h>  </h>", None),
    ("<h>outer <h>inner</h></h>", None),
    ("<H>case matters</H>", None),
])
def test_extract_image_prompt(answer, prompt):
  assert decode.extract_image_prompt(answer) == prompt
