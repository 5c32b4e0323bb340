"""The optimizer: AdamW with warmup + cosine decay, global-norm clipping (optional), regex freezing."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mgjax.checkpoint import path_str


def schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine decay to lr * end_lr_factor at total_steps.

  The warmup is optim.warmup_steps, or with optim.warmup_ratio > 0 that fraction of the run,
  rounded up as Hugging Face's Trainer rounds its --warmup_ratio.
  """
  ratio = optim_cfg.get("warmup_ratio", 0.0)
  warmup = math.ceil(ratio * total_steps) if ratio > 0 else optim_cfg.warmup_steps
  warmup = min(warmup, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup,
                                            decay_steps=max(total_steps, warmup + 1),
                                            end_value=optim_cfg.lr * optim_cfg.end_lr_factor)


def frozen_labels(params: Any, patterns: tuple[str, ...]) -> Any:
  """'frozen' for every parameter whose path fully matches one of the regexes, else 'trainable'."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if any(c.fullmatch(path_str(path)) for c in compiled) else "trainable", params)


def make(optim_cfg: ml_collections.ConfigDict, total_steps: int,
         params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns the optimizer for `params` (a tree of arrays or shapes) and its LR schedule."""
  lr = schedule(optim_cfg, total_steps)
  adamw = optax.adamw(
      lr,
      b1=optim_cfg.b1,
      b2=optim_cfg.b2,
      weight_decay=optim_cfg.weight_decay,
      mu_dtype=jnp.dtype(optim_cfg.get("mu_dtype", "float32")),
      # Decay matrices only; norms' scales and biases are left alone.
      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  # grad_clip <= 0 means no clipping, as Mini-Gemini's runs have none (its DeepSpeed configs
  # set no gradient_clipping, whose default is 0): clip_by_global_norm(0) would not skip
  # clipping but scale every gradient to zero. identity() has the same (empty) state, so a
  # checkpoint's optimizer state restores whichever the run used.
  clip = optax.clip_by_global_norm(optim_cfg.grad_clip) if optim_cfg.grad_clip > 0 else optax.identity()
  trainable = optax.chain(clip, adamw)
  labels = frozen_labels(params, tuple(optim_cfg.freeze))
  if "trainable" not in jax.tree.leaves(labels):
    raise ValueError(f"optim.freeze={tuple(optim_cfg.freeze)} freezes every parameter: nothing would train")
  tx = optax.multi_transform({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)
  multipliers = tuple(optim_cfg.get("lr_multipliers", ()))
  if multipliers:
    factors = lr_factors(params, multipliers)
    tx = optax.chain(tx, optax.stateless(lambda updates, _: jax.tree.map(lambda u, f: u * f, updates, factors)))
  return tx, lr


def lr_factors(params: Any, multipliers: tuple[tuple[str, float], ...]) -> Any:
  """Per parameter, the factor of the first (regex, factor) in optim.lr_multipliers whose
  regex fully matches its path, else 1.

  Scaling an AdamW update by f is training that parameter at f times the learning rate, weight
  decay included: what Mini-Gemini's --lr_multi does with a torch parameter group of its own.
  """
  compiled = [(re.compile(pattern), float(factor)) for pattern, factor in multipliers]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: next((f for c, f in compiled if c.fullmatch(path_str(path))), 1.0), params)
