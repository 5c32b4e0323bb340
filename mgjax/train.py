"""The trainer. Reads top to bottom:

  mesh -> data -> model and optimizer -> init or restore -> compiled steps -> loop
  (guards, evaluate, early stop / drift, checkpoint) -> result and report

Both stages run through `run`; what makes stage 2 a stage 2 (params-only start from
stage 1, its own schedule and split, the drift guard's reference) is config plus
mgjax.stages.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from etils import epath
from flax import nnx

from mgjax import checkpoint, decode, evaluate as evaluation, lora, metrics, optim, report as reports
from mgjax import locks, preemption, sharding, stages, throughput
from mgjax.data import build, pipeline
from mgjax.loss import chunked_flops, summed_cross_entropy
from mgjax.data import tokenizer as tokenizers
from mgjax.models import attention, vlm


def stage_name(stage: int) -> str:
  """'pretraining' for stage 0 (configs/pretrain.py), else 'stage N'."""
  return "pretraining" if stage == 0 else f"stage {stage}"


@dataclasses.dataclass
class Summary:
  """What a run trained and where it went (printed by main, read by the recipe)."""

  stage: int
  workdir: str
  steps: int  # steps trained (fewer than configured when a guard or early stopping ended the run)
  train_loss: float
  val_loss_start: dict[str, float]
  val_loss_end: dict[str, float]  # at the result checkpoint
  checkpoint: str  # the result: what stage 2, predict and export use
  num_params: int
  num_trainable: int
  seconds: float
  init_from: str | None = None
  report: dict[str, Any] = dataclasses.field(default_factory=dict)

  def format(self) -> str:
    lines = [
        f"{stage_name(self.stage)}: {self.steps} steps in {self.seconds:.0f}s, "
        f"{self.num_trainable:,} of {self.num_params:,} params trained",
        f"  final train loss {self.train_loss:.4f}",
    ]
    for split, end in self.val_loss_end.items():
      lines.append(f"  {split:<18} loss {self.val_loss_start.get(split, float('nan')):.4f} -> {end:.4f}")
    stopped = self.report.get("stopped")
    if stopped:
      lines.append(f"  stopped at step {stopped['step']}: {stopped['message']}")
    if self.init_from:
      lines.append(f"  started from {self.init_from}")
    lines.append(f"  result     {self.checkpoint}")
    lines.append(f"  report     {os.path.join(self.workdir, 'report.md')}")
    lines.append(
        f"  metrics    {os.path.join(self.workdir, 'metrics.jsonl')} (TensorBoard: {os.path.join(self.workdir, 'tensorboard')})"
    )
    return "\n".join(lines)


def resolve_model_config(model_cfg: ml_collections.ConfigDict, tokenizer) -> ml_collections.ConfigDict:
  """Fills in what the tokenizer decides: the <image> token id; checks the vocabulary fits."""
  model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  if len(tokenizer) > model_cfg.vocab_size:
    raise ValueError(f"tokenizer {tokenizer.name_or_path} has {len(tokenizer)} tokens but model.vocab_size is "
                     f"{model_cfg.vocab_size}; raise --config.model.vocab_size (a multiple of 128 shards best)")
  model_cfg.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
  return model_cfg


def save_tokenizer(tokenizer, workdir: str) -> None:
  """Copies the tokenizer into WORKDIR/tokenizer: a workdir is all predict and export need."""
  target = epath.Path(workdir) / "tokenizer"
  target.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as local:  # save_pretrained writes local files only
    tokenizer.save_pretrained(local)
    for f in epath.Path(local).iterdir():
      (target / f.name).write_bytes(f.read_bytes())


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


def total_steps(config: ml_collections.ConfigDict, train_records: int) -> int:
  """train.steps, or train.epochs of the train split when set (the cap stage 2 is sized by)."""
  if config.train.epochs:
    return max(1, math.ceil(config.train.epochs * train_records / config.data.batch_size))
  return config.train.steps


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


def run(config: ml_collections.ConfigDict, workdir: str) -> Summary:
  """Trains one stage in `workdir` (resuming what a killed run left there) and reports it.

  Process 0 holds the workdir's lock for the whole run (mgjax.locks): a second run on the
  same workdir is refused with locks.LockHeld naming the first.
  """
  if jax.process_index() != 0:
    return _run(config, workdir)
  with locks.exclusive(workdir, "mgjax_run", f"workdir {workdir}"):
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> Summary:
  started = time.time()
  is_main = jax.process_index() == 0
  use_lora = config.lora.rank > 0
  # The checkpoint this stage starts from, checked before any data work; a resumed run
  # takes it from its own checkpoint's meta instead.
  init_checkpoint = (stages.init_checkpoint(config.init_from, config.get("init_from_step", 0)) if config.init_from and
                     not checkpoint.has_checkpoints(workdir) and not checkpoint.finished(workdir) else None)

  # ---------------------------------------------------------------- Mesh
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  logging.info("mesh %s over %d devices, %d process(es)", dict(mesh.shape), mesh.size, jax.process_count())

  # ---------------------------------------------------------------- Data
  if jax.process_count() == 1:
    dataset = build.ensure_built(config.data.recipe, config.data.data_dir)
  else:
    # One process builds (data_dir is shared storage on a pod); the others wait, then open it.
    if is_main:
      build.ensure_built(config.data.recipe, config.data.data_dir)
    multihost_utils.sync_global_devices("mgjax: dataset built")
    dataset = build.load_built(config.data.recipe, config.data.data_dir)
  # The LLM's conversation format (model.template; '' keeps the tokenizer's own) and the
  # special tokens the pipeline needs; saved below, so predict uses the same.
  tokenizer = tokenizers.apply_template(tokenizers.load(dataset.tokenizer_dir), config.model.get("template", ""))
  if is_main:
    save_tokenizer(tokenizer, workdir)
  model_cfg = resolve_model_config(config.model, tokenizer)
  # The attention kernel for this platform and row layout (cuDNN's takes unpacked rows only).
  model_cfg.attention = attention.for_run(model_cfg.get("attention", "auto"), mesh.devices.flat[0].platform,
                                          packed=config.data.packing)
  encoder = pipeline.make_encoder(tokenizer, config.data, model_cfg, vlm.num_image_tokens(model_cfg))
  local_batch = sharding.batch_size_per_process(config.data.batch_size, mesh)
  train_source = build.open_split(dataset, config.data.train_split)
  replay_source = (build.open_split(dataset, config.data.replay_split) if config.data.replay_fraction > 0 else None)
  train_iter = pipeline.train_iterator(train_source, encoder, batch_size=local_batch, seed=config.seed,
                                       num_threads=config.data.num_threads, prefetch=config.data.prefetch,
                                       replay_source=replay_source, replay_fraction=config.data.replay_fraction,
                                       packing=config.data.packing)
  val_sources = {split: build.open_split(dataset, split) for split in config.data.val_splits}
  eval_local_batch = sharding.batch_size_per_process(config.train.eval_batch_size, mesh)
  steps = total_steps(config, len(train_source))
  accum = config.train.grad_accum_steps
  if local_batch % accum or (config.data.batch_size // accum) % sharding.batch_shards(mesh):
    raise ValueError(f"train.grad_accum_steps={accum} must split data.batch_size={config.data.batch_size} into "
                     f"micro-batches that still divide over the {sharding.batch_shards(mesh)} batch shards of the mesh")

  # ---------------------------------------------------------------- Model and optimizer
  # Shapes first (nothing allocated), then every weight is created directly in its shard.
  with nnx.use_eager_sharding(False):
    abstract_model = nnx.eval_shape(lambda: vlm.MiniGemini(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract_model)
  param_shardings = sharding.state_shardings(abstract_state, mesh, rules).to_pure_dict()
  abstract_params = sharding.abstract_like(abstract_state.to_pure_dict(), param_shardings)

  def create_params():
    with nnx.use_eager_sharding(False):
      return nnx.split(vlm.MiniGemini(model_cfg, rngs=nnx.Rngs(config.seed)))[1].to_pure_dict()

  init_params = jax.jit(create_params, out_shardings=param_shardings)

  # What the optimizer trains: the weights themselves, or (LoRA) adapters on frozen weights.
  if use_lora:
    abstract_adapters = jax.eval_shape(lambda: lora.init(abstract_params, config.lora, jax.random.key(0)))
    adapter_shardings = lora.shardings(abstract_adapters, param_shardings)
    abstract_trainable = sharding.abstract_like(abstract_adapters, adapter_shardings)
    init_adapters = jax.jit(lambda: lora.init(abstract_params, config.lora, jax.random.key(config.seed)),
                            out_shardings=adapter_shardings)
  else:
    abstract_adapters, abstract_trainable = None, abstract_params

  def model_params(trainable, frozen):
    """Plain weights for the forward pass: merged adapters under LoRA, else the weights trained."""
    return lora.merge(frozen, trainable, config.lora) if use_lora else trainable

  plain_params = jax.jit(model_params, out_shardings=param_shardings)
  tx, lr_schedule = optim.make(config.optim, steps, abstract_trainable)
  abstract_opt_state = sharding.abstract_optimizer_state(tx, abstract_trainable, mesh)
  opt_shardings = jax.tree.map(lambda x: x.sharding, abstract_opt_state)
  init_opt_state = jax.jit(tx.init, out_shardings=opt_shardings)

  # ---------------------------------------------------------------- Init or restore
  ckpts = checkpoint.Checkpoints(workdir, max_to_keep=config.train.max_to_keep)
  finished = reports.read(workdir)
  if finished and finished.get("complete"):
    # A completed run asked again: nothing to train, report what it made.
    ckpts.close()
    return _summary_from_report(config, workdir, finished, started)
  # A killed run restarted with the same command: continue exactly where it stopped, from
  # the newest checkpoint that reads back intact (damaged ones are moved aside).
  start_step, params, opt_state, meta_state, adapters = ckpts.restore_latest_intact(
      abstract_params=abstract_params, abstract_opt_state=abstract_opt_state, data_iter=train_iter,
      abstract_adapters=abstract_adapters) if ckpts.all_steps() else (0, None, None, {}, None)
  if start_step is None:
    raise checkpoint.CheckpointError(
        f"no checkpoint under {ckpts.directory} reads back intact (the damaged ones are now in "
        f"{ckpts.directory.parent / 'corrupt_checkpoints'}); to train this stage from its start, "
        "use a new --workdir")
  init_from = None
  if start_step:
    init_from = meta_state.get("init_from")
    if use_lora:
      # The checkpoint's params are merged; LoRA trains on the exact weights it started from.
      params = (stages.load_init_params(init_from["checkpoint"], abstract_params)[0] if init_from else init_params())
    trainable = adapters if use_lora else params
    logging.info("resumed from %s at step %d", ckpts.directory / str(start_step), start_step)
  else:
    if init_checkpoint:
      params, init_from = stages.load_init_params(init_checkpoint, abstract_params)
    else:
      params = init_params()
    trainable = init_adapters() if use_lora else params
    opt_state = init_opt_state(trainable)
  frozen = params if use_lora else None  # LoRA's base weights; never updated
  num_params = sum(x.size for x in jax.tree.leaves(params))
  if use_lora:
    num_trainable = sum(x.size for x in jax.tree.leaves(trainable))
  else:
    labels = optim.frozen_labels(params, tuple(config.optim.freeze))
    num_trainable = sum(x.size for x, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if l == "trainable")

  # ---------------------------------------------------------------- Compiled steps
  # LoRA trains adapters only (optim.freeze applies to plain weights).
  train_step, summed_loss = make_train_step(graphdef, tx, model_params, accum,
                                            () if use_lora else tuple(config.optim.freeze), config.train.loss_chunk)

  replicated = sharding.replicated(mesh)
  train_step = jax.jit(
      train_step, donate_argnums=(0, 1), out_shardings=(jax.tree.map(lambda x: x.sharding,
                                                                     abstract_trainable), opt_shardings, replicated))
  eval_step = jax.jit(summed_loss, out_shardings=replicated)

  writer = metrics.MetricsWriter(workdir, resume_step=start_step if start_step else None)
  peak_tflops = throughput.peak_tflops_per_device(override=config.train.peak_tflops)

  def compile_train_step(batch: dict[str, jax.Array]) -> tuple[Any, float | None]:
    """The train step compiled for this batch's shapes, and its FLOPs per device."""
    compiled = train_step.lower(trainable, opt_state, frozen, batch).compile()
    return compiled, step_flops_per_device(compiled, summed_loss, trainable, frozen, batch, accum, mesh.size, model_cfg,
                                           config.train.loss_chunk)

  def evaluate_losses(step: int) -> dict[str, float]:
    losses = {}
    for split, source in val_sources.items():
      total, count = 0.0, 0.0
      for batch in pipeline.eval_batches(source, encoder, batch_size=eval_local_batch,
                                         num_threads=config.data.num_threads):
        loss_sum, n = eval_step(trainable, frozen, sharding.to_global_batch(batch, mesh))
        total, count = total + float(loss_sum), count + float(n)
      losses[split] = total / max(count, 1.0)
      writer.write(step, split, loss=losses[split])
    return losses

  # The chance level of understanding accuracy: the training mix's most common answers.
  # It reads the whole mix, so it is read once, on the first scoring that needs it.
  chance_answers: dict[str, str] | None = None

  def evaluate_scores(step: int, params: Any, losses: dict[str, float]) -> dict[str, dict[str, float]]:
    """Losses plus decoded scores (format rate, prompt F1, accuracy) of `params`."""
    nonlocal chance_answers
    if chance_answers is None and dataset.splits.get("train") and config.eval.decode and config.eval.accuracy_splits:
      chance_answers = evaluation.majority_answers(build.open_split(dataset, "train"))
    generator = decode.Generator(graphdef, params, tokenizer, encoder, max_batch_size=config.eval.batch_size)
    scores = evaluation.evaluate(generator, val_sources, losses, config.eval, majority=chance_answers)
    for split, values in scores.items():
      extra = {k: v for k, v in values.items() if k != "loss" and not k.startswith("num_")}
      if extra:
        writer.write(step, split, **extra)
    return scores

  # ---------------------------------------------------------------- Loop
  meta = {
      "stage": config.stage,
      "config": config.to_dict(),
      "init_from": init_from,
      "dataset": {
          "name": dataset.name,
          "path": str(dataset.dataset_dir),
          "version": dataset.version
      },
  }
  guard = stages.TrainingGuard(config.guard, config.optim)
  stopped: dict[str, Any] | None = None
  # Traced under the mesh and the rules, the model pins activation shardings by logical
  # name (mgjax.models.axes.constrain): the batch stays split the way the data arrives, and
  # it avoids an XLA SPMD miscompile seen on CPU without the pins.
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), preemption.PreemptionWatch() as sigterm:
    if start_step == 0:
      val_start = evaluate_losses(0)
      # Stage 2's starting point is stage 1's result: score it in full, as the "before".
      start_scores = (evaluate_scores(0, params, val_start) if init_from else {
          split: {
              "loss": loss
          } for split, loss in val_start.items()
      })
    else:
      # The guards' reference and the evaluations so far come from the checkpoint, so they
      # survive a lost or truncated metrics.jsonl (older checkpoints: from the metrics).
      val_start = meta_state.get("val_start") or metrics.val_losses_at(workdir, 0)
      start_scores = meta_state["start_scores"]
    # Every evaluation's losses by step (the result's are reported at the end).
    val_history = {int(s): v for s, v in (meta_state.get("val_history") or {}).items()}
    val_history[0] = val_start
    if start_step and start_step not in val_history:
      val_history[start_step] = metrics.val_losses_at(workdir, start_step)
    drift = stages.DriftGuard(config.guard, val_start if init_from else None)
    early_stop = stages.EarlyStopping(config.early_stop, meta_state.get("early_stop"))
    drift_log = list(meta_state.get("drift", []))
    if start_step == 0 and init_from:
      early_stop.update(0, val_start, within_bounds=True)  # the starting point is a candidate result
    val_end = dict(val_history[start_step])
    window_losses, window_tokens, window_slots, window_start = [], 0.0, 0, time.time()
    window_router = []  # the router load-balancing losses of a decoder with experts
    train_loss = (meta_state.get("train_loss", metrics.train_loss_at(workdir, start_step))
                  if start_step else float("nan"))
    progress = tqdm.tqdm(total=steps, initial=start_step, disable=not is_main, desc=stage_name(config.stage),
                         dynamic_ncols=True)
    step = start_step
    pending = None  # the previous step's metrics, checked once the next step is dispatched
    compiled_step, flops_per_device = None, None  # compiled at the first batch

    def check(step_and_metrics) -> None:
      nonlocal stopped
      at, m = step_and_metrics
      problem = guard.check(at, float(m["loss"]), float(m["grad_norm"]), float(m["count"]))
      if problem:
        # A checkpoint of the step before holds the very weights that gave this loss.
        ckpts.wait()
        if at - 1 in ckpts.all_steps():
          ckpts.delete(at - 1)
        last = ckpts.latest_step()
        stopped = {
            "reason": "guard",
            "step": at,
            "message": problem,
            "last_good_checkpoint": str(ckpts.directory / str(last)) if last else None
        }

    while step < steps and not stopped:
      step += 1
      local = next(train_iter)
      window_tokens += float(local["segment_ids"].astype(bool).sum()) * jax.process_count()
      window_slots += local["segment_ids"].size * jax.process_count()
      batch = sharding.to_global_batch(local, mesh)
      if compiled_step is None:
        compiled_step, flops_per_device = compile_train_step(batch)
        window_start = time.time()  # rates measure training, not compiling
      trainable, opt_state, step_metrics = compiled_step(trainable, opt_state, frozen, batch)
      window_losses.append(step_metrics["loss"])
      if "router_aux_loss" in step_metrics:
        window_router.append(step_metrics["router_aux_loss"])
      progress.update(1)
      if pending:
        check(pending)  # the previous step, while this one runs
      pending = (step, step_metrics)
      is_eval = step % config.train.eval_every == 0 or step == steps
      # SIGTERM (spot VM preemption, a stopped job): the step in flight is done; log and save it.
      preempted = sigterm.requested(step)
      if (is_eval or preempted or step % config.train.checkpoint_every == 0 or step % config.train.log_every == 0):
        check(pending)  # nothing bad may be logged as good, or saved
        pending = None
      if stopped:
        break
      if preempted:
        stopped = {"reason": "preempted", "step": step, "message": f"{sigterm.signal_name} received"}

      if step % config.train.log_every == 0 or step == steps or preempted:
        losses = [float(l) for l in window_losses]  # waits for the device: timing is honest
        train_loss = losses[-1]
        elapsed = time.time() - window_start
        speed = throughput.rates(steps=len(losses), seconds=elapsed, tokens=window_tokens,
                                 flops_per_device=flops_per_device, peak_tflops=peak_tflops, num_devices=mesh.size)
        router = ({"router_aux_loss": float(np.mean([float(r) for r in window_router]))} if window_router else {})
        writer.write(
            step,
            "train",
            loss=float(np.mean(losses)),
            lr=float(lr_schedule(step - 1)),
            grad_norm=float(step_metrics["grad_norm"]),
            tokens_per_s=window_tokens / elapsed,
            steps_per_s=len(losses) / elapsed,
            # the share of token slots holding real tokens (not padding)
            token_efficiency=window_tokens / max(window_slots, 1),
            **speed,
            **router)
        progress.set_postfix(loss=f"{np.mean(losses):.3f}",
                             **{k: f"{speed[k]:.3g}" for k in ("tflops_per_device", "mfu") if k in speed})
        window_losses, window_tokens, window_slots, window_start = [], 0.0, 0, time.time()
        window_router = []

      score = None
      if is_eval:
        eval_started = time.time()
        val_end = val_history[step] = evaluate_losses(step)
        checked = drift.check(val_end)
        if checked.changes:
          drift_log.append({"step": step, "changes": checked.changes, "within_bounds": checked.within_bounds})
        if early_stop.update(step, val_end, checked.within_bounds):
          stopped = {
              "reason": "early_stop",
              "step": step,
              "message": f"{early_stop.split} did not improve for {early_stop.patience} evaluation(s); "
                         f"best {early_stop.best_value:.4f} at step {early_stop.best_step}"
          }
        if not checked.within_bounds:
          message = (f"understanding drifted past guard.drift_threshold={drift.threshold:.0%} from where "
                     f"this stage started ({checked.describe()}); lower optim.lr, cap train.steps, raise "
                     "data.replay_fraction or use LoRA (lora.rank)")
          if drift.action == "warn":
            logging.warning("step %d: %s", step, message)
            progress.write(f"warning: step {step}: {message}")
          else:
            stopped = {"reason": f"drift_{drift.action}", "step": step, "message": message}
        score = val_end[early_stop.split] if checked.within_bounds else None
        progress.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in val_end.items()))
        window_start += time.time() - eval_started  # the next log's rates exclude evaluating

      if is_eval or step % config.train.checkpoint_every == 0 or stopped:
        ckpts.save(
            step, params=plain_params(trainable, frozen), opt_state=opt_state, data_iter=train_iter,
            adapters=trainable if use_lora else None, score=score, meta={
                **meta, "step": step,
                "start_scores": start_scores,
                "early_stop": early_stop.state(),
                "drift": drift_log,
                "val_start": val_start,
                "val_history": {
                    str(s): v for s, v in val_history.items()
                },
                "train_loss": train_loss
            })
    progress.close()
    ckpts.wait()

    # ---------------------------------------------------------------- Result and report
    if stopped and stopped["reason"] == "preempted":
      writer.close()
      ckpts.close()
      saved = str(ckpts.directory / str(step))
      raise preemption.Preempted(
          f"{stage_name(config.stage)} stopped by {sigterm.signal_name} after step {step} of {steps}; "
          f"checkpoint {saved} holds everything needed: run the same command again to resume.", step=step,
          checkpoint=saved, signal_name=sigterm.signal_name)
    if stopped and stopped["reason"] == "guard":
      writer.close()
      ckpts.close()
      last = stopped["last_good_checkpoint"]
      raise stages.GuardTripped(
          f"stage {config.stage} stopped at step {stopped['step']}: {stopped['message']}\n" +
          (f"Last good checkpoint: {last} (nothing after it was saved)."
           if last else "No checkpoint was saved before it."), reason="guard", step=stopped["step"], checkpoint=last)

    # The result: the best in-bounds evaluation under early stopping or after a rollback
    # (stage 2's own start is a candidate: stage 2 must not make things worse), else the
    # last step.
    result_step, why = step, "last step"
    keep_best = config.early_stop.patience > 0 or (stopped and stopped["reason"] == "drift_rollback")
    if keep_best and early_stop.best_step is not None:
      result_step, why = early_stop.best_step, f"best {early_stop.split} loss within the drift bounds"
    if result_step == 0:
      result_checkpoint, why = init_from["checkpoint"], "no step improved on the checkpoint this stage started from"
    else:
      result_checkpoint = str(ckpts.directory / str(result_step))
    if result_step == step:
      result_params = plain_params(trainable, frozen)
    else:
      result_params = stages.load_init_params(result_checkpoint, abstract_params)[0]
    val_result = val_history.get(result_step) or metrics.val_losses_at(workdir, result_step)
    end_scores = evaluate_scores(result_step, result_params, val_result)

  stage_key = f"stage{config.stage}"
  report = {
      "stage": config.stage,
      stage_key: end_scores,
      "complete": True,
      "result": {
          "step": result_step,
          "checkpoint": checkpoint.relative_to(result_checkpoint, workdir),
          "why": why
      },
      "stopped": stopped,
      "drift": drift_log,
      "steps_trained": step
  }
  report[_start_key(config.stage, init_from)] = start_scores
  if is_main:
    reports.write(workdir, report)
  ckpts.close()
  writer.close()

  return Summary(stage=config.stage, workdir=workdir, steps=step, train_loss=train_loss, val_loss_start=val_start,
                 val_loss_end=val_result, checkpoint=result_checkpoint, num_params=int(num_params),
                 num_trainable=int(num_trainable), seconds=time.time() - started,
                 init_from=init_from["checkpoint"] if init_from else None, report=report)


def _start_key(stage: int, init_from: Any) -> str:
  """The report key of a stage's starting scores: the stage it started from ("stage0",
  "stage1"), or "start" for a stage trained from scratch."""
  return f"stage{stage - 1}" if init_from and stage > 0 else "start"


def _summary_from_report(config, workdir: str, report: dict, started: float) -> Summary:
  result = dict(report["result"], checkpoint=checkpoint.result_checkpoint(workdir))
  stage_scores = report[f"stage{config.stage}"]
  start_scores = next((report[k] for k in (f"stage{config.stage - 1}", "start") if k in report), {})
  return Summary(stage=config.stage, workdir=workdir, steps=report["steps_trained"],
                 train_loss=metrics.train_loss_at(workdir, report["steps_trained"]), val_loss_start={
                     s: v["loss"] for s, v in start_scores.items()
                 }, val_loss_end={
                     s: v["loss"] for s, v in stage_scores.items()
                 }, checkpoint=result["checkpoint"], num_params=0, num_trainable=0, seconds=time.time() - started,
                 init_from=None, report=report)
