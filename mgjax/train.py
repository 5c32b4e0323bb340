"""The trainer. Reads top to bottom:

  mesh -> data -> model and optimizer -> init or restore -> compiled steps -> loop
  (evaluate, log, checkpoint) -> summary

Both stages run through `run`; what makes stage 2 a stage 2 (params-only start from
stage 1, its own schedule and split) is config plus mgjax.stages.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
import transformers
from etils import epath
from flax import nnx

from mgjax import checkpoint, metrics, optim, sharding, stages
from mgjax.data import build, pipeline
from mgjax.models import vlm


@dataclasses.dataclass
class Summary:
  """What a run trained and where it went (printed by main, read by the recipe)."""

  stage: int
  workdir: str
  steps: int
  train_loss: float
  val_loss_start: dict[str, float]
  val_loss_end: dict[str, float]
  checkpoint: str
  num_params: int
  num_trainable: int
  seconds: float
  init_from: str | None = None

  def format(self) -> str:
    lines = [
        f"stage {self.stage}: {self.steps} steps in {self.seconds:.0f}s, "
        f"{self.num_trainable:,} of {self.num_params:,} params trained",
        f"  final train loss {self.train_loss:.4f}",
    ]
    for split, end in self.val_loss_end.items():
      lines.append(f"  {split:<18} loss {self.val_loss_start.get(split, float('nan')):.4f} -> {end:.4f}")
    if self.init_from:
      lines.append(f"  started from {self.init_from}")
    lines.append(f"  checkpoint {self.checkpoint}")
    lines.append(f"  metrics    {os.path.join(self.workdir, 'metrics.jsonl')} (TensorBoard: {os.path.join(self.workdir, 'tensorboard')})")
    return "\n".join(lines)


def resolve_model_config(model_cfg: ml_collections.ConfigDict, tokenizer) -> ml_collections.ConfigDict:
  """Fills in what the tokenizer decides: the <image> token id; checks the vocabulary fits."""
  model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  if len(tokenizer) > model_cfg.vocab_size:
    raise ValueError(
        f"tokenizer {tokenizer.name_or_path} has {len(tokenizer)} tokens but model.vocab_size is "
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


def make_loss_fn(graphdef: nnx.GraphDef):
  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    logits = model(batch["input_ids"], batch["images_lowres"], batch["images_highres"],
                   positions=batch["positions"], segment_ids=batch["segment_ids"])
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    loss_sum = jnp.sum(token_loss * batch["loss_mask"])
    count = jnp.sum(batch["loss_mask"])
    return loss_sum / jnp.maximum(count, 1.0), (loss_sum, count)
  return loss_fn


def run(config: ml_collections.ConfigDict, workdir: str) -> Summary:
  started = time.time()
  is_main = jax.process_index() == 0

  # ---------------------------------------------------------------- Mesh
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  logging.info("mesh %s over %d devices, %d process(es)", dict(mesh.shape), mesh.size, jax.process_count())

  # ---------------------------------------------------------------- Data
  dataset = build.ensure_built(config.data.recipe, config.data.data_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(dataset.tokenizer_dir)
  if is_main:
    save_tokenizer(tokenizer, workdir)
  model_cfg = resolve_model_config(config.model, tokenizer)
  encoder = pipeline.make_encoder(tokenizer, config.data, model_cfg, vlm.num_image_tokens(model_cfg))
  local_batch = sharding.batch_size_per_process(config.data.batch_size, mesh)
  train_source = build.open_split(dataset, config.data.train_split)
  train_iter = pipeline.train_iterator(
      train_source, encoder, batch_size=local_batch, seed=config.seed,
      num_threads=config.data.num_threads, prefetch=config.data.prefetch)
  val_sources = {split: build.open_split(dataset, split) for split in config.data.val_splits}
  eval_local_batch = sharding.batch_size_per_process(config.train.eval_batch_size, mesh)

  # ---------------------------------------------------------------- Model and optimizer
  # Shapes first (nothing allocated), then every weight is created directly in its shard.
  with nnx.use_eager_sharding(False):
    abstract_model = nnx.eval_shape(lambda: vlm.MiniGemini(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract_model)
  param_shardings = sharding.state_shardings(abstract_state, mesh, rules).to_pure_dict()

  def create_params():
    with nnx.use_eager_sharding(False):
      return nnx.split(vlm.MiniGemini(model_cfg, rngs=nnx.Rngs(config.seed)))[1].to_pure_dict()

  init_params = jax.jit(create_params, out_shardings=param_shardings)
  abstract_params = sharding.abstract_like(abstract_state.to_pure_dict(), param_shardings)
  tx, lr_schedule = optim.make(config.optim, config.train.steps, abstract_params)
  abstract_opt_state = sharding.abstract_outputs(jax.jit(tx.init), mesh, abstract_params)
  opt_shardings = jax.tree.map(lambda x: x.sharding, abstract_opt_state)
  init_opt_state = jax.jit(tx.init, out_shardings=opt_shardings)

  # ---------------------------------------------------------------- Init or restore
  ckpts = checkpoint.Checkpoints(workdir, max_to_keep=config.train.max_to_keep)
  start_step = ckpts.latest_step() or 0
  init_from = None
  if start_step:
    # A killed run restarted with the same command: continue exactly where it stopped.
    params, opt_state, meta = ckpts.restore(
        start_step, abstract_params=abstract_params, abstract_opt_state=abstract_opt_state, data_iter=train_iter)
    init_from = meta.get("init_from")
    logging.info("resumed from %s at step %d", ckpts.directory / str(start_step), start_step)
  elif config.init_from:
    params, init_from = stages.load_init_params(config.init_from, abstract_params)
    opt_state = init_opt_state(params)
  else:
    params = init_params()
    opt_state = init_opt_state(params)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  labels = optim.frozen_labels(params, tuple(config.optim.freeze))
  num_trainable = sum(x.size for x, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if l == "trainable")

  # ---------------------------------------------------------------- Compiled steps
  loss_fn = make_loss_fn(graphdef)

  def train_step(params, opt_state, batch):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  def eval_step(params, batch):
    _, (loss_sum, count) = loss_fn(params, batch)
    return loss_sum, count

  replicated = sharding.replicated(mesh)
  train_step = jax.jit(
      train_step, donate_argnums=(0, 1),
      out_shardings=(param_shardings, opt_shardings, replicated))
  eval_step = jax.jit(eval_step, out_shardings=replicated)

  writer = metrics.MetricsWriter(workdir, resume_step=start_step if start_step else None)

  def evaluate(step: int, params) -> dict[str, float]:
    losses = {}
    for split, source in val_sources.items():
      total, count = 0.0, 0.0
      for batch in pipeline.eval_batches(source, encoder, batch_size=eval_local_batch,
                                         num_threads=config.data.num_threads):
        loss_sum, n = eval_step(params, sharding.to_global_batch(batch, mesh))
        total, count = total + float(loss_sum), count + float(n)
      losses[split] = total / max(count, 1.0)
      writer.write(step, split, loss=losses[split])
    return losses

  # ---------------------------------------------------------------- Loop
  meta = {
      "stage": config.stage, "config": config.to_dict(), "init_from": init_from,
      "dataset": {"name": dataset.name, "path": str(dataset.dataset_dir), "version": dataset.version},
  }
  # Traced under the mesh and the rules, the model pins activation shardings by logical
  # name (mgjax.models.axes.constrain): the batch stays split the way the data arrives, and
  # it avoids an XLA SPMD miscompile seen on CPU without the pins.
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    val_start = evaluate(0, params) if start_step == 0 else metrics.val_losses_at(workdir, 0)
    # A run restarted after its last step has nothing left to do but report.
    val_end = metrics.val_losses_at(workdir, start_step) if start_step else dict(val_start)
    window_losses, window_tokens, window_start = [], 0.0, time.time()
    train_loss = metrics.train_loss_at(workdir, start_step) if start_step else float("nan")
    progress = tqdm.tqdm(total=config.train.steps, initial=start_step, disable=not is_main,
                         desc=f"stage {config.stage}", dynamic_ncols=True)
    for step in range(start_step + 1, config.train.steps + 1):
      local = next(train_iter)
      window_tokens += float(local["segment_ids"].astype(bool).sum()) * jax.process_count()
      params, opt_state, step_metrics = train_step(params, opt_state, sharding.to_global_batch(local, mesh))
      window_losses.append(step_metrics["loss"])
      progress.update(1)

      if step % config.train.log_every == 0 or step == config.train.steps:
        losses = [float(l) for l in window_losses]  # waits for the device: timing is honest
        train_loss = losses[-1]
        elapsed = time.time() - window_start
        writer.write(step, "train", loss=float(np.mean(losses)), lr=float(lr_schedule(step - 1)),
                     grad_norm=float(step_metrics["grad_norm"]), tokens_per_s=window_tokens / elapsed,
                     steps_per_s=len(losses) / elapsed)
        progress.set_postfix(loss=f"{np.mean(losses):.3f}")
        window_losses, window_tokens, window_start = [], 0.0, time.time()

      if step % config.train.eval_every == 0 or step == config.train.steps:
        val_end = evaluate(step, params)
        progress.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in val_end.items()))

      if step % config.train.checkpoint_every == 0 or step == config.train.steps:
        ckpts.save(step, params=params, opt_state=opt_state, data_iter=train_iter, meta={**meta, "step": step})
  progress.close()
  ckpts.wait()
  ckpts.close()
  writer.close()

  return Summary(
      stage=config.stage, workdir=workdir, steps=config.train.steps, train_loss=train_loss,
      val_loss_start=val_start, val_loss_end=val_end,
      checkpoint=str(ckpts.directory / str(config.train.steps)), num_params=int(num_params),
      num_trainable=int(num_trainable), seconds=time.time() - started,
      init_from=init_from["checkpoint"] if init_from else None)
