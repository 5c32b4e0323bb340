"""The train step and everything it is built from, for a config on a mesh.

  setup(config, model_cfg, mesh, total_steps) -> StepSetup

gives the model's graph and abstract weights, their shardings, what the optimizer trains (the
weights themselves, or LoRA adapters on frozen weights: a `Trainable`), the optimizer, the
jitted train, evaluation and weight-merging steps, and the train step's FLOPs (`mgjax.flops`).
`mgjax.train` runs them; `mgjax.plan` compiles the same ones for a topology it does not have,
so the plan is the run's program.

The step works on plain dicts of arrays (`nnx.split` once, `nnx.merge` inside the traced
function): jit, shardings, checkpoints and LoRA all see one pytree of weights, and the graph
is rebuilt from it for free at trace time.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mgjax import flops, lora, optim, sharding
from mgjax.loss import summed_cross_entropy
from mgjax.models import vlm


def make_loss_terms(graphdef: nnx.GraphDef, loss_chunk: int = 0, unroll_loss: bool = False,
                    vocab_sharded: bool = False):
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
                                 unroll=unroll_loss, vocab_sharded=vocab_sharded)
    coef = model.llm.router_aux_loss_coef if router_loss is not None else None
    return total, jnp.sum(batch["loss_mask"]), router_loss, coef

  return loss_terms


def make_loss_fn(graphdef: nnx.GraphDef, loss_chunk: int = 0, unroll_loss: bool = False, vocab_sharded: bool = False):
  """(params, batch) -> (sum of token losses, number of supervised tokens).

  Sums, not a mean, so micro-batches add up to exactly the whole batch's gradient.
  loss_chunk (train.loss_chunk): tokens per chunk of the output projection and loss
  (mgjax.loss), so the whole [B, T, vocab] logits never exist at once; unroll_loss traces
  its chunk loop as straight-line code (for cost figures, see mgjax.flops); vocab_sharded
  (train.loss_vocab_sharded) splits the output projection over the vocabulary in the loss.
  """
  loss_terms = make_loss_terms(graphdef, loss_chunk, unroll_loss, vocab_sharded)

  def loss_fn(params, batch):
    total, count, _, _ = loss_terms(params, batch)
    return total, count

  return loss_fn


def split_micro_batches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...]; micro-batch j takes rows j, j+k, ..., so every device keeps
  its own rows (the batch axis is split over devices in contiguous blocks)."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, model_params: Callable[[Any, Any], Any],
                    accum: int, freeze: tuple[str, ...] = (), loss_chunk: int = 0, unroll_loops: bool = False,
                    vocab_sharded: bool = False, opt_state_on_device: Any = None) -> tuple[Callable, Callable]:
  """The train step (trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics),
  and the summed loss (trainable, frozen, batch) -> (loss sum, token count) it differentiates.

  `model_params(trainable, frozen)` gives the model's weights (merged adapters under LoRA);
  `accum` > 1 sums the gradients of that many micro-batches; `freeze` (optim.freeze) names
  the weights whose gradients are dropped at once, so XLA never computes them (the frozen
  towers' backward pass) and the logged grad_norm covers what trains. Shared by training and
  by `mgjax.plan`, which compiles it for a topology it does not have. unroll_loops traces the
  micro-batch loop and the chunked loss's loop as straight-line code (the cost twins of
  mgjax.flops; same values). `opt_state_on_device`: the optimizer state's device shardings when
  it lives in host memory between steps (optim.offload): the step fetches it to them first.

  A decoder with experts also trains its routers' load balance: the step's objective is the
  mean token loss plus model.llm.router_aux_loss_coef times the load-balancing loss, as
  transformers' MixtralForCausalLM (loss + router_aux_loss_coef * aux_loss). The metrics then
  hold `router_aux_loss` (before the coefficient) beside `loss`, which stays the token loss
  alone, comparable with the validation losses and with dense decoders.
  """
  loss_terms = make_loss_terms(graphdef, loss_chunk, unroll_loops, vocab_sharded)

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
      (loss_sum, count, router_sum, grads), _ = jax.lax.scan(add_micro_batch, zeros, micro_batches,
                                                             unroll=accum if unroll_loops else 1)
    # Mean over the whole batch's supervised tokens, however it was split.
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
    if freeze:
      # Zeros that read nothing: the frozen weights' gradients become dead code.
      labels = optim.frozen_labels(grads, freeze)
      grads = jax.tree.map(lambda g, label: jnp.zeros_like(g) if label == "frozen" else g, grads, labels)
    if opt_state_on_device is not None:
      # Host to device for the update, after the gradients (the jit's out_shardings put the
      # new state back in host memory). When the compiler schedules the copies is its own
      # choice: on mgm_8b (v5p-8) it holds the fetched state through the backward pass, a peak
      # above the one without offloading (benchmarks/RESULTS.md).
      opt_state = jax.device_put(opt_state, opt_state_on_device)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    step_metrics = {"loss": loss_sum / jnp.maximum(count, 1.0), "count": count, "grad_norm": optax.tree.norm(grads)}
    if router_sum is not None:
      step_metrics["router_aux_loss"] = router_sum / jnp.maximum(count, 1.0)
    return trainable, opt_state, step_metrics

  return train_step, summed_loss


# ------------------------------------------------------------------------------ What trains


class Trainable(abc.ABC):
  """What the optimizer trains, and how the model's weights are made from it: the weights
  themselves (`FullWeights`) or LoRA adapters on frozen weights (`LoraAdapters`).

  The train step takes (trainable, frozen): `abstract` and `shardings` describe `trainable`,
  `frozen` is what stays fixed (None, or LoRA's base weights); `freeze` (optim.freeze) names
  the weights whose gradients the step drops; a checkpoint restores into `restore_target`.
  """
  lora: bool
  abstract: Any
  shardings: Any
  freeze: tuple[str, ...]
  restore_target: Any

  @abc.abstractmethod
  def model_params(self, trainable: Any, frozen: Any) -> Any:
    """The model's weights the step runs on."""

  @abc.abstractmethod
  def start(self, params: Any) -> tuple[Any, Any]:
    """(trainable, frozen) for a run starting from `params`."""

  @abc.abstractmethod
  def resume(self, params: Any, adapters: Any, base_params: Callable[[], Any]) -> tuple[Any, Any]:
    """(trainable, frozen) from a restored checkpoint's params (and adapters)."""

  @abc.abstractmethod
  def adapters(self, trainable: Any) -> Any:
    """What a checkpoint stores beside the merged params."""

  @abc.abstractmethod
  def count(self, params: Any, trainable: Any) -> int:
    """How many numbers the optimizer trains."""

  @abc.abstractmethod
  def trains(self, path: str) -> bool:
    """Whether the step computes the gradient of the model weight at `path`
    ('llm/layers/0/self_attn/q_proj/kernel'): what the model FLOPs count (mgjax.flops)."""


class FullWeights(Trainable):
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
    return params, None

  def resume(self, params: Any, adapters: Any, base_params: Callable[[], Any]) -> tuple[Any, Any]:
    return params, None

  def adapters(self, trainable: Any) -> Any:
    return None

  def count(self, params: Any, trainable: Any) -> int:
    labels = optim.frozen_labels(params, self.freeze)
    return sum(x.size for x, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if l == "trainable")

  def trains(self, path: str) -> bool:
    # As optim.frozen_labels matches the freeze patterns.
    return not any(re.fullmatch(pattern, path) for pattern in self.freeze)


class LoraAdapters(Trainable):
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
    self.adapted = frozenset(lora.target_paths(abstract_params, config.lora))
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

  def trains(self, path: str) -> bool:
    # An adapter's gradient is the adapted weight's, contracted with the other factor.
    return path in self.adapted


# ------------------------------------------------------------------------------ Setup


@dataclasses.dataclass
class StepSetup:
  """The model, its shardings, the optimizer and the jitted steps of one run (see `setup`).

  `train_step(trainable, opt_state, frozen, batch)` -> (trainable, opt_state, metrics), donating
  its first two arguments; `eval_step(trainable, frozen, batch)` -> (loss sum, token count);
  `merged(trainable, frozen)` -> the plain weights (for checkpoints and decoding).
  """
  config: ml_collections.ConfigDict
  total_steps: int
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
  eval_step: Any
  merged: Any

  def compile_train_step(self, batch: dict[str, Any], compiler_options: dict | None = None) -> jax.stages.Compiled:
    """The train step compiled for `batch` (arrays or ShapeDtypeStructs with their shardings)
    on abstract weights and optimizer state: nothing is allocated."""
    frozen = self.abstract_params if self.trainable.lora else None
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      lowered = self.train_step.lower(self.trainable.abstract, self.abstract_opt_state, frozen, batch)
      return lowered.compile(compiler_options=compiler_options)

  def hardware_costs(self, batch: dict[str, Any],
                     compiled: jax.stages.Compiled | None = None) -> dict[str, float | None]:
    """XLA's `flops` (one device) and, on TPU, `modelled_seconds` of one call of the train step
    on `batch`, every loop's trips counted (mgjax.flops: from loop-free twins where the step or
    the compiler loops; else from the step as compiled, `compiled` if given)."""
    options = flops.cost_compiler_options(self.mesh.devices.flat[0].device_kind)
    seq_len = batch["input_ids"].shape[1]
    if options is None and not flops.step_has_loops(self.config, self.model_cfg, seq_len):
      return flops.compiled_costs(compiled or self.compile_train_step(batch))
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch)

    def compile_twin(layers: int) -> jax.stages.Compiled:
      twin = setup(self.config, flops.loop_free_model(self.model_cfg, layers), self.mesh, self.total_steps,
                   unroll_loops=True)
      return twin.compile_train_step(spec, compiler_options=options)

    return flops.loop_free_costs(compile_twin, int(self.model_cfg.llm.layers))

  def model_flops(self, seq_len: int) -> flops.ModelFlops:
    """The analytic model FLOPs of training on sequences of seq_len (mgjax.flops)."""
    return flops.model_flops(self.abstract_params, self.model_cfg, seq_len, self.trainable.trains)

  def step_flops(self, compiled: jax.stages.Compiled, batch: dict[str, Any]) -> flops.StepFlops:
    """Model and hardware FLOPs of the compiled train step, for the train log
    (throughput.Window.close)."""
    return flops.StepFlops(hardware_per_device=self.hardware_costs(batch, compiled)["flops"],
                           model=self.model_flops(batch["input_ids"].shape[1]))


def abstract_weights(model_cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: tuple):
  """(graph, weights as ShapeDtypeStructs, their shardings) of the model, laid out over `mesh`
  by `rules`: nothing is allocated."""
  with nnx.use_eager_sharding(False):
    graphdef, abstract_state = nnx.split(vlm.abstract_model(model_cfg))
  param_shardings = sharding.state_shardings(abstract_state, mesh, rules).to_pure_dict()
  return graphdef, sharding.abstract_like(abstract_state.to_pure_dict(), param_shardings), param_shardings


def setup(config: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
          total_steps: int, *, unroll_loops: bool = False) -> StepSetup:
  """Everything the train step needs, from shapes alone: nothing is allocated here.

  Args:
    config: the run's config (optim, lora, train.grad_accum_steps, train.loss_chunk, seed).
    model_cfg: its `model`, resolved (mgjax.run_files.resolve_model_config, the attention kernel).
    mesh: the device mesh; weights and optimizer state are laid out over it by the config's rules.
    total_steps: the schedule's length.
    unroll_loops: trace the micro-batch loop and the chunked loss's loop as straight-line code
      (the cost twins of mgjax.flops).
  """
  rules = sharding.logical_rules(config.mesh)
  graphdef, abstract_params, param_shardings = abstract_weights(model_cfg, mesh, rules)

  def create_params():
    # Every weight is created directly in its shard.
    with nnx.use_eager_sharding(False):
      return nnx.split(vlm.MiniGemini(model_cfg, rngs=nnx.Rngs(config.seed)))[1].to_pure_dict()

  view = (LoraAdapters if config.lora.rank > 0 else FullWeights)(config, abstract_params, param_shardings)
  tx, lr_schedule = optim.make(config.optim, total_steps, view.abstract)
  abstract_opt_state = sharding.abstract_optimizer_state(tx, view.abstract, mesh)
  opt_shardings = jax.tree.map(lambda x: x.sharding, abstract_opt_state)
  opt_state_on_device = None
  if config.optim.offload:
    # The state lives in host memory (created, stepped, checkpointed and restored there); only
    # the step's update holds it on the device.
    opt_state_on_device = opt_shardings
    opt_shardings = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt_shardings)
    abstract_opt_state = sharding.abstract_like(abstract_opt_state, opt_shardings)
  train_step, summed_loss = make_train_step(graphdef, tx, view.model_params, config.train.grad_accum_steps, view.freeze,
                                            config.train.loss_chunk, unroll_loops, config.train.loss_vocab_sharded,
                                            opt_state_on_device)
  replicated = sharding.replicated(mesh)
  return StepSetup(
      config=config, total_steps=total_steps, mesh=mesh, rules=rules, model_cfg=model_cfg, graphdef=graphdef,
      abstract_params=abstract_params, param_shardings=param_shardings,
      init_params=jax.jit(create_params, out_shardings=param_shardings), trainable=view, tx=tx, lr_schedule=lr_schedule,
      abstract_opt_state=abstract_opt_state, init_opt_state=jax.jit(tx.init, out_shardings=opt_shardings),
      train_step=jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(view.shardings, opt_shardings, replicated)),
      eval_step=jax.jit(summed_loss, out_shardings=replicated), merged=jax.jit(view.model_params,
                                                                               out_shardings=param_shardings))
