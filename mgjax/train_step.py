"""The train step and everything it is built from, for a config on a mesh.

  setup(config, model_cfg, mesh, total_steps) -> StepSetup

gives the model's graph and abstract weights, their shardings, what the optimizer trains (the
weights themselves, or LoRA adapters on frozen weights: `Trainable`), the optimizer, and the
jitted train, evaluation and weight-merging steps. `mgjax.train` runs them; `mgjax.plan`
compiles the same ones for a topology it does not have, so the plan is the run's program.

The step works on plain dicts of arrays (`nnx.split` once, `nnx.merge` inside the traced
function): jit, shardings, checkpoints and LoRA all see one pytree of weights, and the graph
is rebuilt from it for free at trace time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mgjax import lora, optim, sharding, throughput
from mgjax.loss import chunked_flops, summed_cross_entropy
from mgjax.models import vlm


def make_loss_terms(graphdef: nnx.GraphDef, loss_chunk: int = 0, unroll_loss: bool = False):
  """(params, batch) -> (sum of token losses, number of supervised tokens, router loss, its
  coefficient).

  For a decoder with experts (model.llm.family 'mixtral') the router loss is its load-balancing
  loss (a mean over the batch's real tokens, DecoderLM.hidden_states) and the coefficient
  model.llm.router_aux_loss_coef (a Python float); for the others both are None.
  Arguments as in `make_loss_fn`.
  """

  def loss_terms(params, batch):
    model = nnx.merge(graphdef, params)
    if model.llm.num_experts:
      # MiniGemini.hidden_states, asking the decoder for its router loss as well.
      embeds = model.embed_inputs(batch["input_ids"], batch["images_lowres"], batch["images_highres"])
      hidden, router_loss = model.llm.hidden_states(inputs_embeds=embeds, positions=batch["positions"],
                                                    segment_ids=batch["segment_ids"], return_router_aux_loss=True)
    else:
      hidden = model.hidden_states(batch["input_ids"], batch["images_lowres"], batch["images_highres"],
                                   positions=batch["positions"], segment_ids=batch["segment_ids"])
      router_loss = None
    total = summed_cross_entropy(hidden, model.llm.output_embedding(), batch["targets"], batch["loss_mask"], loss_chunk,
                                 unroll=unroll_loss)
    coef = model.llm.router_aux_loss_coef if router_loss is not None else None
    return total, jnp.sum(batch["loss_mask"]), router_loss, coef

  return loss_terms


def make_loss_fn(graphdef: nnx.GraphDef, loss_chunk: int = 0, unroll_loss: bool = False):
  """(params, batch) -> (sum of token losses, number of supervised tokens).

  Sums, not a mean, so micro-batches add up to exactly the whole batch's gradient.
  loss_chunk (train.loss_chunk): tokens per chunk of the output projection and loss
  (mgjax.loss), so the whole [B, T, vocab] logits never exist at once; unroll_loss traces
  its chunk loop as straight-line code (for cost figures, see mgjax.plan).
  """
  loss_terms = make_loss_terms(graphdef, loss_chunk, unroll_loss)

  def loss_fn(params, batch):
    total, count, _, _ = loss_terms(params, batch)
    return total, count

  return loss_fn


def split_micro_batches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...]; micro-batch j takes rows j, j+k, ..., so every device keeps
  its own rows (the batch axis is split over devices in contiguous blocks)."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, model_params: Callable[[Any, Any], Any],
                    accum: int, freeze: tuple[str, ...] = (), loss_chunk: int = 0,
                    unroll_loss: bool = False) -> tuple[Callable, Callable]:
  """The train step (trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics),
  and the summed loss (trainable, frozen, batch) -> (loss sum, token count) it differentiates.

  `model_params(trainable, frozen)` gives the model's weights (merged adapters under LoRA);
  `accum` > 1 sums the gradients of that many micro-batches; `freeze` (optim.freeze) names
  the weights whose gradients are dropped at once, so XLA never computes them (the frozen
  towers' backward pass) and the logged grad_norm covers what trains. Shared by training and
  by `mgjax.plan`, which compiles it for a topology it does not have.

  A decoder with experts also trains its routers' load balance: the step's objective is the
  mean token loss plus model.llm.router_aux_loss_coef times the load-balancing loss, as
  transformers' MixtralForCausalLM (loss + router_aux_loss_coef * aux_loss). The metrics then
  hold `router_aux_loss` (before the coefficient) beside `loss`, which stays the token loss
  alone, comparable with the validation losses and with dense decoders.
  """
  loss_terms = make_loss_terms(graphdef, loss_chunk, unroll_loss)

  def summed_loss(trainable, frozen, batch):
    total, count, _, _ = loss_terms(model_params(trainable, frozen), batch)
    return total, count

  def objective(trainable, frozen, batch):
    """(what the step differentiates, (token-loss sum, token count, router loss * count))."""
    total, count, router_loss, coef = loss_terms(model_params(trainable, frozen), batch)
    if router_loss is None:
      return total, (total, count, None)
    # The step divides by the supervised-token count: the router loss, a mean per batch,
    # enters times that count so it comes out as coef * router loss (micro-batches: their
    # router losses weighted by their token counts).
    router_sum = router_loss * count
    return total + coef * router_sum, (total, count, router_sum)

  def train_step(trainable, opt_state, frozen, batch):
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if accum == 1:
      (_, (loss_sum, count, router_sum)), grads = grad_fn(trainable, frozen, batch)
    else:

      def add_micro_batch(carry, micro):
        (_, terms), grads = grad_fn(trainable, frozen, micro)
        return jax.tree.map(jnp.add, carry, (*terms, grads)), None

      micro_batches = split_micro_batches(batch, accum)
      (_, terms), grads = jax.eval_shape(grad_fn, trainable, frozen, jax.tree.map(lambda x: x[0], micro_batches))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (*terms, grads))
      (loss_sum, count, router_sum, grads), _ = jax.lax.scan(add_micro_batch, zeros, micro_batches)
    # Mean over the whole batch's supervised tokens, however it was split.
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
    if freeze:
      # Zeros that read nothing: the frozen weights' gradients become dead code.
      labels = optim.frozen_labels(grads, freeze)
      grads = jax.tree.map(lambda g, label: jnp.zeros_like(g) if label == "frozen" else g, grads, labels)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    step_metrics = {"loss": loss_sum / jnp.maximum(count, 1.0), "count": count, "grad_norm": optax.tree.norm(grads)}
    if router_sum is not None:
      step_metrics["router_aux_loss"] = router_sum / jnp.maximum(count, 1.0)
    return trainable, opt_state, step_metrics

  return train_step, summed_loss


def step_flops_per_device(compiled: jax.stages.Compiled, summed_loss: Callable, trainable: Any, frozen: Any,
                          batch: dict[str, Any], accum: int, num_devices: int,
                          model_cfg: ml_collections.ConfigDict | None = None, loss_chunk: int = 0) -> float | None:
  """FLOPs of one call of the compiled train step on one device (make_train_step's step).

  XLA counts a loop's body once. The micro-batch scan's other trips are counted from the
  un-partitioned HLO of one micro-batch; the other trips of a scanned decoder
  (model.llm.scan_layers, given model_cfg) and of the chunked loss (loss_chunk) from one
  layer's and one chunk's forward and backward. All of these are global FLOPs, split over
  the devices. `batch` may hold arrays or ShapeDtypeStructs.
  """
  b, t = batch["input_ids"].shape

  def uncounted_trips(rows: int) -> float:
    """Global FLOPs of the layer and loss-chunk loops' trips after the first, for `rows` rows."""
    if model_cfg is None:
      return 0.0
    flops = 0.0
    llm = vlm.abstract_model(model_cfg).llm
    if llm.scan_layers:
      flops += (llm.num_layers - 1) * (llm.scanned_layer_flops(rows, t) or 0.0)
    return flops + chunked_flops(rows, t, llm.hidden, llm.vocab_size, loss_chunk, llm.dtype)

  flops = throughput.step_flops(compiled)
  if flops:
    flops += uncounted_trips(b // accum) / num_devices
  if accum > 1:
    micro = jax.eval_shape(lambda b: jax.tree.map(lambda x: x[0], split_micro_batches(b, accum)), batch)
    micro_flops = throughput.lowered_flops(
        jax.jit(jax.value_and_grad(summed_loss, has_aux=True)).lower(trainable, frozen, micro))
    if micro_flops:
      micro_flops += uncounted_trips(b // accum)
    flops = throughput.accumulated_flops(flops, micro_flops and micro_flops / num_devices, accum)
  return flops


# ------------------------------------------------------------------------------ What trains


class FullWeights:
  """Full fine-tuning: the optimizer trains the weights themselves (optim.freeze names the
  ones whose gradients are dropped). Nothing else is frozen, so `frozen` is None."""
  lora = False

  def __init__(self, config: ml_collections.ConfigDict, abstract_params: Any, param_shardings: Any):
    self.abstract = abstract_params
    self.shardings = param_shardings
    self.freeze = tuple(config.optim.freeze)
    self.restore_target = None  # a checkpoint's params are the trained weights

  def model_params(self, trainable: Any, frozen: Any) -> Any:
    return trainable

  def start(self, params: Any) -> tuple[Any, Any]:
    """(trainable, frozen) for a run starting from `params`."""
    return params, None

  def resume(self, params: Any, adapters: Any, base_params: Callable[[], Any]) -> tuple[Any, Any]:
    """(trainable, frozen) from a restored checkpoint's params (and adapters)."""
    return params, None

  def adapters(self, trainable: Any) -> Any:
    """What a checkpoint stores beside the merged params: nothing."""
    return None

  def count(self, params: Any, trainable: Any) -> int:
    labels = optim.frozen_labels(params, self.freeze)
    return sum(x.size for x, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if l == "trainable")


class LoraAdapters:
  """LoRA (lora.rank > 0): the optimizer trains low-rank adapters; the weights stay frozen and
  the model runs on their merge (a weight delta, so the forward pass is the model's own)."""
  lora = True

  def __init__(self, config: ml_collections.ConfigDict, abstract_params: Any, param_shardings: Any):
    self.config = config.lora
    adapters = jax.eval_shape(lambda: lora.init(abstract_params, config.lora, jax.random.key(0)))
    self.shardings = lora.shardings(adapters, param_shardings)
    self.abstract = sharding.abstract_like(adapters, self.shardings)
    self.freeze = ()  # optim.freeze applies to plain weights
    self.restore_target = adapters
    self._init = jax.jit(lambda: lora.init(abstract_params, config.lora, jax.random.key(config.seed)),
                         out_shardings=self.shardings)

  def model_params(self, trainable: Any, frozen: Any) -> Any:
    return lora.merge(frozen, trainable, self.config)

  def start(self, params: Any) -> tuple[Any, Any]:
    return self._init(), params

  def resume(self, params: Any, adapters: Any, base_params: Callable[[], Any]) -> tuple[Any, Any]:
    # The checkpoint's params are merged; LoRA trains on the exact weights it started from.
    return adapters, base_params()

  def adapters(self, trainable: Any) -> Any:
    return trainable

  def count(self, params: Any, trainable: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(trainable))


Trainable = FullWeights | LoraAdapters

# ------------------------------------------------------------------------------ Setup


@dataclasses.dataclass
class StepSetup:
  """The model, its shardings, the optimizer and the jitted steps of one run (see `setup`).

  `train_step(trainable, opt_state, frozen, batch)` -> (trainable, opt_state, metrics), donating
  its first two arguments; `eval_step(trainable, frozen, batch)` -> (loss sum, token count);
  `merged(trainable, frozen)` -> the plain weights (for checkpoints and decoding).
  """
  mesh: jax.sharding.Mesh
  rules: tuple
  model_cfg: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  abstract_params: Any
  param_shardings: Any
  init_params: Callable[[], Any]
  trainable: Trainable
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  abstract_opt_state: Any
  init_opt_state: Callable[[Any], Any]
  train_step: Any
  summed_loss: Callable
  eval_step: Any
  merged: Any
  accum: int
  loss_chunk: int

  def flops_per_device(self, compiled: jax.stages.Compiled, trainable: Any, frozen: Any, batch: dict) -> float | None:
    """FLOPs of one call of the compiled train step on one device (see step_flops_per_device)."""
    return step_flops_per_device(compiled, self.summed_loss, trainable, frozen, batch, self.accum, self.mesh.size,
                                 self.model_cfg, self.loss_chunk)


def setup(config: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
          total_steps: int, *, unroll_loss: bool = False) -> StepSetup:
  """Everything the train step needs, from shapes alone: nothing is allocated here.

  Args:
    config: the run's config (optim, lora, train.grad_accum_steps, train.loss_chunk, seed).
    model_cfg: its `model`, resolved (mgjax.run_files.resolve_model_config, the attention kernel).
    mesh: the device mesh; weights and optimizer state are laid out over it by the config's rules.
    total_steps: the schedule's length.
    unroll_loss: trace the chunked loss's loop as straight-line code (mgjax.plan's cost twins).
  """
  rules = sharding.logical_rules(config.mesh)
  with nnx.use_eager_sharding(False):
    graphdef, abstract_state = nnx.split(vlm.abstract_model(model_cfg))
  param_shardings = sharding.state_shardings(abstract_state, mesh, rules).to_pure_dict()
  abstract_params = sharding.abstract_like(abstract_state.to_pure_dict(), param_shardings)

  def create_params():
    # Every weight is created directly in its shard.
    with nnx.use_eager_sharding(False):
      return nnx.split(vlm.MiniGemini(model_cfg, rngs=nnx.Rngs(config.seed)))[1].to_pure_dict()

  view = (LoraAdapters if config.lora.rank > 0 else FullWeights)(config, abstract_params, param_shardings)
  tx, lr_schedule = optim.make(config.optim, total_steps, view.abstract)
  abstract_opt_state = sharding.abstract_optimizer_state(tx, view.abstract, mesh)
  opt_shardings = jax.tree.map(lambda x: x.sharding, abstract_opt_state)
  accum = config.train.grad_accum_steps
  train_step, summed_loss = make_train_step(graphdef, tx, view.model_params, accum, view.freeze,
                                            config.train.loss_chunk, unroll_loss)
  replicated = sharding.replicated(mesh)
  return StepSetup(
      mesh=mesh, rules=rules, model_cfg=model_cfg, graphdef=graphdef, abstract_params=abstract_params,
      param_shardings=param_shardings, init_params=jax.jit(create_params, out_shardings=param_shardings),
      trainable=view, tx=tx, lr_schedule=lr_schedule, abstract_opt_state=abstract_opt_state,
      init_opt_state=jax.jit(tx.init, out_shardings=opt_shardings),
      train_step=jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(view.shardings, opt_shardings, replicated)),
      summed_loss=summed_loss, eval_step=jax.jit(summed_loss, out_shardings=replicated),
      merged=jax.jit(view.model_params, out_shardings=param_shardings), accum=accum, loss_chunk=config.train.loss_chunk)
