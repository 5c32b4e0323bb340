"""Imported weights as a trainer checkpoint, and a trainer checkpoint's weights back out.

An import writes OUT/checkpoints/0/{params,meta}, the layout `--config.init_from=OUT` reads
(mgjax.stages.load_init_params): params of the whole MiniGemini, where the parts that were
imported replace a fresh initialisation (the same one the trainer would make with that seed),
and meta {"stage": 0, "step": 0, "config": the training config, "imported": {part: source}}.
The trainer checks the params against its own model config and names every tensor that does
not fit, so a checkpoint imported for one preset cannot silently start another.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mgjax import checkpoint
from mgjax.models import vlm


def fresh_params(model_cfg: ml_collections.ConfigDict, seed: int = 0) -> dict[str, Any]:
  """The whole MiniGemini's params (a pure dict of numpy arrays) as the trainer initialises them."""

  def create():
    with nnx.use_eager_sharding(False):
      return nnx.to_pure_dict(nnx.split(vlm.MiniGemini(model_cfg, rngs=nnx.Rngs(seed)))[1])

  # One jitted program (XLA's persistent cache keeps it across runs) rather than one compile
  # per initializer, run on the host: an accelerator may not hold the whole model in float32.
  # vlm's tracer patch keeps tracing a large model linear in its size (see vlm.abstract_model).
  cheap_tracing = getattr(vlm, "_cheap_tracer_errors", contextlib.nullcontext)
  with jax.default_device(jax.devices("cpu")[0]), cheap_tracing():
    return jax.tree.map(np.asarray, jax.jit(create)())


def graft(params: dict[str, Any], part: str, imported: Mapping[str, Any]) -> dict[str, Any]:
  """params with params[part] replaced by `imported`, after checking they have the same tree.

  Raises:
    checkpoint.CheckpointError: listing every path whose presence or shape differs.
  """

  def shapes(tree):
    return {checkpoint.path_str(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}

  want, got = shapes(params[part]), shapes(imported)
  problems = [
      f"  {part}/{p}: imported {got[p]} vs model {want[p]}" for p in sorted(want) if p in got and got[p] != want[p]
  ]
  problems += [f"  {part}/{p}: not imported (model wants {want[p]})" for p in sorted(want) if p not in got]
  problems += [f"  {part}/{p}: imported {got[p]} but not in the model" for p in sorted(got) if p not in want]
  if problems:
    raise checkpoint.CheckpointError(f"imported {part} does not fit the model config:\n" + "\n".join(problems))
  return {**params, part: jax.tree.map(lambda x: np.asarray(x, np.float32), imported)}


def write_init_checkpoint(out: str, params: Mapping[str, Any], config: Mapping[str, Any], imported: Mapping[str, str],
                          hf_llm_config: Mapping[str, Any] | None = None) -> str:
  """Saves params as OUT/checkpoints/0 for `--config.init_from=OUT`; returns that folder.

  Args:
    out: the folder (a workdir of its own; it must not hold checkpoints yet).
    params: the whole model's params.
    config: the training config (a dict) the params are for, recorded in meta.
    imported: which parts came from where, e.g. {"llm": "/models/vicuna-7b-v1.5"}.
    hf_llm_config: config.json values of the imported LLM that mgjax's model config does not
      hold (max_position_embeddings), for export-llm to write back (see `hf_llm_config`).
  """
  root = os.path.abspath(out)
  directory = os.path.join(root, "checkpoints")
  if os.path.exists(directory) and os.listdir(directory):
    raise checkpoint.CheckpointError(f"{directory} already holds checkpoints; import into an empty folder")
  handlers = {"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True),
                             item_handlers=handlers) as manager:
    meta = {
        "stage": 0,
        "step": 0,
        "config": dict(config),
        "imported": dict(imported),
        "init_from": None,
        "hf_llm_config": dict(hf_llm_config or {})
    }
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(dict(params)), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
  return os.path.join(directory, "0")


def hf_llm_config(path: str) -> dict[str, Any]:
  """The config.json values import-llm recorded for the LLM a checkpoint descends from,
  following each stage's init_from back to the imported checkpoint; {} for a model trained
  from scratch (or when a checkpoint on the way is gone)."""
  seen = set()
  while path and path not in seen:
    seen.add(path)
    try:
      workdir, step = checkpoint.locate(path)
      ckpts = checkpoint.Checkpoints(workdir, read_only=True)
      meta = ckpts.meta(step)
      ckpts.close()
    except checkpoint.CheckpointError:
      return {}
    if meta.get("hf_llm_config"):
      return dict(meta["hf_llm_config"])
    path = (meta.get("init_from") or {}).get("checkpoint")
  return {}


def read_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any], str]:
  """(params on one device, the run's config dict, the checkpoint folder) of a workdir's result
  checkpoint, its checkpoints/ folder or one checkpoints/<step> folder, without building a model."""
  workdir, step = checkpoint.locate(path)
  ckpts = checkpoint.Checkpoints(workdir, read_only=True)
  one = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), ckpts.param_metadata(step),
                        is_leaf=lambda x: hasattr(x, "shape"))
  params, meta = ckpts.restore_params(step, target)
  ckpts.close()
  return params, meta.get("config") or {}, str(ckpts.directory / str(step))
