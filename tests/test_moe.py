"""The Mixtral family (sparse mixture of experts) against transformers' MixtralForCausalLM on a
tiny random model (float32): logits, the router load-balancing loss, the scanned stack, KV-cache
decoding, expert-parallel sharding on 8 devices, and the checkpoint round trip."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from configs.models.sample import get_config  # noqa: E402
from mgjax import base_config  # noqa: E402
from mgjax import train_step  # noqa: E402
from mgjax.convert import ConversionError, files, import_hf_llm, load_hf_lm  # noqa: E402
from mgjax.convert import llm_weights  # noqa: E402
from mgjax.models import logical_shardings, vlm  # noqa: E402
from mgjax.models import llm  # noqa: E402
from mgjax.models import moe  # noqa: E402
from mgjax.models.llm import DecoderLM  # noqa: E402

VOCAB = 128
EXPERTS = 4
COEF = 0.02  # Mixtral-8x7B's router_aux_loss_coef
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
  """(transformers MixtralForCausalLM, its saved folder, the mgjax model imported from it).

  Every weight is drawn afresh (norm weights around 1), so a swapped or transposed expert
  would show in the logits; output_router_logits is on, so transformers' forward adds
  router_aux_loss_coef * aux_loss to its loss and the import takes that coefficient.
  """
  cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   num_local_experts=EXPERTS, num_experts_per_tok=2, router_aux_loss_coef=COEF,
                                   output_router_logits=True)
  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if (p.ndim == 1 and "norm" in name) else 0.0))
  folder = str(tmp_path_factory.mktemp("mixtral"))
  hf.save_pretrained(folder)
  return hf, folder, load_hf_lm(folder)


def _ids(batch=2, seq=16, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int32)


def _hf(hf, ids, mask=None):
  """transformers' forward; its loss is over the tokens that are not padding (labels -100)."""
  labels = ids if mask is None else np.where(mask > 0, ids, -100)
  with torch.no_grad():
    return hf(torch.as_tensor(ids, dtype=torch.long), labels=torch.as_tensor(labels, dtype=torch.long),
              attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long))


_hidden_and_aux = nnx.jit(lambda m, ids, seg: m.hidden_states(ids, segment_ids=seg, return_router_aux_loss=True))


def test_checkpoint_names_and_config(mixtral):
  _, folder, model = mixtral
  names = files.load_tensors(folder)
  # The released checkpoints' names, which transformers' save_pretrained writes too.
  assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
  llm_cfg, vocab = llm_weights.llm_config_from_hf(files.read_config(folder))
  assert (llm_cfg["family"], llm_cfg["num_experts"], llm_cfg["experts_per_token"]) == ("mixtral", EXPERTS, 2)
  assert llm_cfg["router_aux_loss_coef"] == COEF and model.router_aux_loss_coef == COEF
  w1 = model.layers[1].block_sparse_moe.experts.w1
  assert w1.shape == (EXPERTS, 32, 48) and w1.get_metadata()["out_sharding"] == moe.EXPERT_IN
  np.testing.assert_array_equal(np.asarray(w1[...][3]), names["model.layers.1.block_sparse_moe.experts.3.w1.weight"].T)
  # Without output_router_logits transformers never adds the loss (Mini-Gemini's training).
  off = {**files.read_config(folder), "output_router_logits": False}
  assert llm_weights.llm_config_from_hf(off)[0]["router_aux_loss_coef"] == 0.0
  mgm = {**files.read_config(folder), "model_type": "mgm_mixtral", "architectures": ["MGMMixtralForCausalLM"]}
  assert llm_weights.detect_family(mgm) == "mixtral"
  with pytest.raises(ConversionError, match="sliding_window=4096"):
    llm_weights.llm_config_from_hf({**files.read_config(folder), "sliding_window": 4096})


def test_logits_match_transformers(mixtral):
  hf, _, model = mixtral
  ids = _ids()
  ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
  diff = np.abs(ours - _hf(hf, ids).logits.numpy()).max()
  print(f"mixtral: max abs logit difference {diff:.2e}")
  assert ours.shape == (2, 16, VOCAB) and diff <= TOLERANCE


def test_router_aux_loss_matches_transformers(mixtral):
  """transformers' aux_loss (load_balancing_loss_func over every layer), unpadded and with a
  padded row, whose padding (attention_mask 0 there, segment id 0 here) it leaves out."""
  hf, _, model = mixtral
  ids = _ids(seed=1)
  mask = np.ones_like(ids)
  mask[1, 11:] = 0  # row 1: 11 real tokens, then padding
  for m in (np.ones_like(ids), mask):
    ref = _hf(hf, ids, m)
    _, aux = _hidden_and_aux(model, ids, m.astype(np.int32))
    ref_aux = float(ref.aux_loss)
    print(f"aux loss {float(aux):.6f} vs transformers {ref_aux:.6f}")
    assert abs(COEF * float(aux) - hf.router_aux_loss_coef * ref_aux) < 1e-7
    assert abs(float(aux) - ref_aux) < 1e-5
  # The padded tokens are left out: counting them gives another value.
  assert abs(float(_hidden_and_aux(model, ids, np.ones_like(ids))[1]) - float(aux)) > 1e-4
  # And the padded batch's loss is transformers' loss: token cross-entropy + coef * aux.
  logits = np.asarray(model.logits(_hidden_and_aux(model, ids, mask.astype(np.int32))[0]))[:, :-1]
  targets, weights = ids[:, 1:], mask[:, 1:].astype(np.float32)
  ce = np.sum(np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, targets)) * weights) / weights.sum()
  assert abs(ce + COEF * float(aux) - float(ref.loss)) < 1e-5


def test_experts_equal_a_dense_loop_over_experts():
  """The sorted ragged_dot path against the definition: each token's k experts, one by one."""
  layer = moe.SparseMoE(16, 24, 6, 3, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (2, 5, 16))
  (y, stats), (probs, weights, index) = nnx.jit(lambda m, x: (m(x), m.route(x)))(layer, x)
  w1, w3, w2 = (np.asarray(w[...]) for w in (layer.experts.w1, layer.experts.w3, layer.experts.w2))
  xs, weights, index = np.asarray(x), np.asarray(weights), np.asarray(index)
  expected = np.zeros_like(xs)
  for b in range(2):
    for t in range(5):
      for j in range(3):
        e = index[b, t, j]
        gate = xs[b, t] @ w1[e]
        expected[b, t] += weights[b, t, j] * ((gate / (1 + np.exp(-gate)) * (xs[b, t] @ w3[e])) @ w2[e])
  np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
  assert len({tuple(sorted(r)) for r in index.reshape(-1, 3)}) > 1  # the tokens go different ways
  assert float(stats[0].sum()) == 2 * 5 * 3  # every token's k slots counted once
  np.testing.assert_allclose(np.asarray(stats[1]), np.asarray(probs.sum((0, 1))), atol=1e-5)


KW = dict(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp=48, family="mixtral",
          num_experts=EXPERTS, router_aux_loss_coef=COEF)


@functools.partial(jax.jit, static_argnums=0)
def _objective(graph, params, ids, segment_ids):
  """Mean token cross-entropy + coef * router loss of a DecoderLM, and its gradients (compiled
  once per graph and shapes, so tests on the same model share the program)."""

  def f(params):
    model = nnx.merge(graph, params)
    hidden, aux = model.hidden_states(ids, segment_ids=segment_ids, return_router_aux_loss=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(model.logits(hidden)[:, :-1], ids[:, 1:])
    return jnp.mean(ce * segment_ids[:, 1:]) + model.router_aux_loss_coef * aux

  return jax.value_and_grad(f)(params)


@pytest.fixture(scope="module")
def scanned():
  """(graphdef, params, ids, segment ids, loss, gradients) of a scanned Mixtral (remat 'full')
  on one device; rows 0, 3 and 6 end in padding."""
  graph, params = nnx.split(DecoderLM(**KW, scan_layers=True, remat="full", rngs=nnx.Rngs(0)))
  ids = jax.random.randint(jax.random.key(2), (8, 12), 0, 64)
  segments = jnp.ones((8, 12), jnp.int32).at[::3, 8:].set(0)
  return (graph, params, ids, segments, *_objective(graph, params, ids, segments))


def test_scanned_layers_equal_the_unrolled_stack_and_decode(scanned):
  scan_graph, scan_state, ids, segments, scan_loss, scan_grads = scanned
  assert scan_state["layers"]["block_sparse_moe"]["experts"]["w2"].get_metadata()["out_sharding"] == ("layers",
                                                                                                      "expert", "mlp",
                                                                                                      "embed")
  plain_graph, plain_params = nnx.split(DecoderLM(**KW, rngs=nnx.Rngs(1)))
  nnx.replace_by_pure_dict(plain_params, llm.unstack_layers(scan_state.to_pure_dict()))
  plain_loss, plain_grads = _objective(plain_graph, plain_params, ids, segments)
  np.testing.assert_allclose(scan_loss, plain_loss, atol=1e-6)
  expected = llm.stack_layers(jax.tree.map(np.asarray, plain_grads.to_pure_dict()))
  for a, b in zip(jax.tree.leaves(scan_grads.to_pure_dict()), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # The router gets gradients (from the aux loss and from its weighting of the experts).
  assert np.abs(np.asarray(plain_grads["layers"][0]["block_sparse_moe"]["gate"]["kernel"])).max() > 0
  # KV-cache decoding through the stacked cache: prefill, then one step, equal the full forward.
  model = nnx.merge(scan_graph, scan_state)
  extend = nnx.jit(lambda m, x, cache: m.extend(x, cache=cache))
  ids = ids[:2]
  full = nnx.jit(lambda m, x: m(x))(model, jnp.concatenate([ids, ids[:, :1]], axis=1))
  logits, cache = extend(model, ids, model.init_cache(2, 16))
  np.testing.assert_allclose(logits, full[:, :-1], atol=1e-5)
  step, _ = extend(model, ids[:, :1], cache)
  np.testing.assert_allclose(step[:, 0], full[:, -1], atol=1e-5)


# Mesh rules: experts split over 'tensor' (expert parallelism; 'mlp' then stays whole), and
# over 'fsdp' (a batch axis: the tokens are gathered, the output scattered back).
_BASE_RULES = dict(base_config.base_config().mesh.rules)
EXPERT_RULES = {
    "tensor": {
        **_BASE_RULES, "expert": "tensor",
        "mlp": None
    },
    "fsdp": {
        **_BASE_RULES, "expert": "fsdp",
        "embed": None,
        "mlp": None
    },
}


@pytest.mark.parametrize("split", sorted(EXPERT_RULES))
def test_experts_split_over_a_mesh_axis_give_the_single_device_loss(scanned, split):
  assert jax.device_count() >= 8, "tests/conftest.py must set XLA_FLAGS before jax starts"
  graph, single, ids, segments, ref_loss, ref_grads = scanned
  rules = tuple(EXPERT_RULES[split].items())
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  sharded = jax.tree.map(jax.device_put, single, logical_shardings(single, mesh, rules))
  w1 = sharded["layers"]["block_sparse_moe"]["experts"]["w1"][...]
  assert w1.sharding.spec[1] == split  # [layers, expert, embed, mlp]
  assert w1.addressable_shards[0].data.shape[1] == EXPERTS // 2
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    loss, grads = _objective(graph, sharded, *jax.device_put((ids, segments), batch))
  print(f"experts over {split}: loss {float(loss):.6f} vs one device {float(ref_loss):.6f}")
  np.testing.assert_allclose(loss, ref_loss, atol=1e-6)
  for path, g in nnx.to_flat_state(ref_grads):
    np.testing.assert_allclose(np.asarray(dict(nnx.to_flat_state(grads))[path][...]), np.asarray(g[...]), atol=1e-6,
                               err_msg="/".join(map(str, path)))


class TextOnly(nnx.Module):
  """MiniGemini's interface to the loss (embed_inputs, hidden_states, llm) around a bare
  DecoderLM: the train step without compiling the vision towers."""

  def __init__(self, llm: DecoderLM):
    self.llm = llm

  def embed_inputs(self, input_ids, images_lowres, images_highres):
    del images_lowres, images_highres  # no images
    return self.llm.embed(input_ids)

  def hidden_states(self, input_ids, images_lowres, images_highres, *, positions=None, segment_ids=None):
    return self.llm.hidden_states(inputs_embeds=self.embed_inputs(input_ids, images_lowres, images_highres),
                                  positions=positions, segment_ids=segment_ids)


def test_train_step_adds_the_router_loss():
  """make_train_step with a Mixtral decoder: the step's `loss` is the token loss,
  `router_aux_loss` the decoder's, and the update follows loss + coef * router_aux_loss."""
  cfg = get_config()
  cfg.llm = dict(hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp=48, family="mixtral", num_experts=EXPERTS,
                 router_aux_loss_coef=0.5)
  gate = vlm.abstract_model(cfg).llm.layers[1].block_sparse_moe.gate.kernel
  assert gate.shape == (32, EXPERTS)  # MiniGemini builds with the Mixtral decoder
  graph, params = nnx.split(TextOnly(DecoderLM(vocab_size=64, **cfg.llm, rngs=nnx.Rngs(0))))
  params = params.to_pure_dict()
  rng = np.random.default_rng(0)
  batch = {
      "input_ids": rng.integers(0, 64, (2, 10)).astype(np.int32),
      "targets": rng.integers(0, 64, (2, 10)).astype(np.int32),
      "loss_mask": np.ones((2, 10), np.float32),
      "positions": np.tile(np.arange(10, dtype=np.int32), (2, 1)),
      "segment_ids": np.ones((2, 10), np.int32),
      "images_lowres": np.zeros((2, 0, 1, 1, 3), np.float32),
      "images_highres": np.zeros((2, 0, 1, 1, 3), np.float32)
  }
  batch["loss_mask"][1, 6:] = 0
  batch["segment_ids"][1, 8:] = 0
  step, summed_loss = train_step.make_train_step(graph, optax.sgd(1.0), lambda t, f: t, accum=1)

  @jax.jit
  def run(params):
    """The step's new params and metrics, and the loss terms and gradient computed apart."""
    new, _, metrics = step(params, optax.sgd(1.0).init(params), None, batch)
    total, count = summed_loss(params, None, batch)

    def router_loss(p):
      return nnx.merge(graph, nnx.State(p)).llm.hidden_states(batch["input_ids"], segment_ids=batch["segment_ids"],
                                                              return_router_aux_loss=True)[1]

    grad = jax.grad(lambda p: summed_loss(p, None, batch)[0] / count + 0.5 * router_loss(p))(params)
    return new, metrics, total / count, router_loss(params), grad

  new, metrics, loss, aux, grad = run(params)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["router_aux_loss"], aux, rtol=1e-6)
  assert float(aux) > 1.0  # E * sum(f * P) >= 1, equal only when perfectly balanced
  # SGD at lr 1: the update is minus the gradient of the token loss + 0.5 * the router loss.
  for name in ("gate", "experts"):
    for a, b, g in zip(
        *(jax.tree.leaves(t["llm"]["layers"][0]["block_sparse_moe"][name]) for t in (params, new, grad))):
      np.testing.assert_allclose(np.asarray(a) - np.asarray(b), np.asarray(g), atol=1e-6)


def test_export_import_round_trip(mixtral, tmp_path):
  hf, folder, _ = mixtral
  found, _ = llm_weights.llm_config_from_hf(files.read_config(folder))
  params, llm_cfg, vocab, unused = import_hf_llm(folder, llm={**found, "scan_layers": True})
  assert not unused and params["layers"]["block_sparse_moe"]["experts"]["w1"].shape == (2, EXPERTS, 32, 48)
  llm_weights.export_hf_llm(params, llm_cfg, str(tmp_path / "out"), max_shard_bytes=60_000)
  config = json.load(open(os.path.join(tmp_path, "out", "config.json")))
  assert (config["num_local_experts"], config["num_experts_per_tok"], config["router_aux_loss_coef"],
          config["output_router_logits"], config["sliding_window"]) == (EXPERTS, 2, COEF, True, None)
  assert files.load_tensors(str(tmp_path / "out")).keys() == files.load_tensors(folder).keys()
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
  ids = _ids(seed=2)
  assert np.abs(_hf(reloaded, ids).logits.numpy() - _hf(hf, ids).logits.numpy()).max() == 0.0
  again, again_cfg, _, _ = import_hf_llm(str(tmp_path / "out"))
  assert again_cfg == {k: v for k, v in llm_cfg.items() if k != "scan_layers"}
  for a, b in zip(jax.tree.leaves(llm.stack_layers(again)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
