"""What evaluation's decoding needs on planned devices (`python -m mgjax.plan --decoding`).

mgjax.decode's programs, compiled ahead of time on abstract values for the devices and weight
layout the trainer decodes with (its mesh and rules): `eval.batch_size` prompts of
`data.seq_len` tokens with `data.max_images` image slots, each continued by up to
`eval.max_new_tokens` tokens.

  whole program  `decode._generate_cached`, what evaluation runs: the prefill (DecoderLM.prefill:
                 training's attention, no [B, T, S] mask, the last position's logits only), then
                 the decode steps in a while loop over one KV cache. Its memory is the figure that decides
                 whether decoding fits beside nothing else (the trainer's state is not live then
                 in a separate evaluation; during training it is: add the train step's weights).
  prefill, step  `decode._prefill` and `decode._decode_step` alone, for their cost figures: XLA
                 counts a loop's body once, so a scanned decoder's costs come from loop-free twins
                 with one and two layers (mgjax.flops.loop_free_costs), as the train step's do.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax import decode, flops, sharding, train_step


def _prompt_batch(config, mesh, train_batch: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.ShapeDtypeStruct]:
  """decode.left_pad's batch at the eval lengths, split over the batch axes as the trainer's."""
  rows, length = config.eval.batch_size, config.data.seq_len
  split = sharding.batch_sharding(mesh)

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=split)

  return {
      "input_ids": spec((rows, length), jnp.int32),
      "prompt_mask": spec((rows, length), jnp.bool_),
      "images_lowres": spec((rows, *train_batch["images_lowres"].shape[1:]), train_batch["images_lowres"].dtype),
      "images_highres": spec((rows, *train_batch["images_highres"].shape[1:]), train_batch["images_highres"].dtype),
  }


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  return {
      "argument_bytes": m.argument_size_in_bytes,
      "temp_bytes": m.temp_size_in_bytes,
      # Donated inputs alias outputs: they are only counted once.
      "peak_bytes": m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes,
  }


def plan_decoding(config, setup, train_batch: dict[str, jax.ShapeDtypeStruct]) -> dict[str, Any]:
  """Per-device memory of evaluation's decoding and the cost model's time of its prefill and of
  one decode step; `setup` is the planned train step's mgjax.train_step.StepSetup."""
  mesh, rules, model_cfg = setup.mesh, setup.rules, setup.model_cfg
  replicated = sharding.replicated(mesh)
  batch = _prompt_batch(config, mesh, train_batch)
  new_tokens = config.eval.max_new_tokens
  cache_size = config.data.seq_len + new_tokens
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)

  def prefill(graphdef, params, options=None):
    return decode._prefill.lower(graphdef, params, batch, cache_size=cache_size).compile(compiler_options=options)

  def step(graphdef, params, prefilled, options=None):
    # The cache as the prefill leaves it: its shapes, and the layout the compiler chose.
    _, cache_shardings = prefilled.output_shardings
    _, cache_shapes = jax.eval_shape(lambda p, b: decode._prefill(graphdef, p, b, cache_size=cache_size), params, batch)
    cache = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), cache_shapes,
                         cache_shardings)
    tokens = jax.ShapeDtypeStruct((batch["input_ids"].shape[0],), jnp.int32, sharding=sharding.batch_sharding(mesh))
    return decode._decode_step.lower(graphdef, params, tokens, cache).compile(compiler_options=options)

  # Costs compile with the options of mgjax.flops (on v5e/v6e: no windowed-einsum loops, which
  # cost analysis would count once); the memory figures are the programs as they run.
  options = flops.cost_compiler_options(mesh.devices.flat[0].device_kind)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    whole = decode._generate_cached.lower(setup.graphdef, setup.abstract_params, batch, key, scalar, scalar,
                                          max_new_tokens=new_tokens, temperature=0.0, top_k=0, top_p=1.0,
                                          num_tokens=None, unstack_layers=False).compile()
    prefilled = prefill(setup.graphdef, setup.abstract_params)
    stepped = step(setup.graphdef, setup.abstract_params, prefilled)
    layers = int(model_cfg.llm.layers)
    if model_cfg.llm.get("scan_layers", False):

      def twin(n):
        graphdef, params, _ = train_step.abstract_weights(flops.loop_free_model(model_cfg, n), mesh, rules)
        return graphdef, params, prefill(graphdef, params, options)

      twins = {n: twin(n) for n in ((1, 2) if layers > 1 else (1,))}
      prefill_costs = flops.loop_free_costs(lambda n: twins[n][2], layers)
      step_costs = flops.loop_free_costs(lambda n: step(*twins[n], options), layers)
    elif options is not None:
      costed = prefill(setup.graphdef, setup.abstract_params, options)
      prefill_costs = flops.compiled_costs(costed)
      step_costs = flops.compiled_costs(step(setup.graphdef, setup.abstract_params, costed, options))
    else:
      prefill_costs, step_costs = flops.compiled_costs(prefilled), flops.compiled_costs(stepped)

  rows = config.eval.batch_size
  out = {
      "batch": rows,
      "prompt_tokens": config.data.seq_len,
      "max_new_tokens": new_tokens,
      "image_slots": config.data.max_images,
      "whole": _memory(whole),
      "prefill": {
          **_memory(prefilled), "modelled_seconds": prefill_costs["modelled_seconds"],
          "hardware_flops": prefill_costs["flops"]
      },
      "step": {
          **_memory(stepped), "modelled_seconds": step_costs["modelled_seconds"],
          "hardware_flops": step_costs["flops"]
      },
  }
  if out["step"]["modelled_seconds"]:
    out["modelled_tokens_per_second"] = rows / out["step"]["modelled_seconds"]
  if out["prefill"]["modelled_seconds"] and out["step"]["modelled_seconds"]:
    # The longest an evaluation batch can take: the prefill and every new token.
    out["modelled_batch_seconds"] = out["prefill"]["modelled_seconds"] + new_tokens * out["step"]["modelled_seconds"]
  return out


def format_decoding(d: dict[str, Any], bytes_text, device_bytes: float | None = None) -> list[str]:
  """The decoding plan as report lines (bytes_text formats a byte count; device_bytes: the
  device's memory, on a TPU target, to say whether it fits)."""
  lines = [
      f"decoding (evaluation: {d['batch']} prompts of {d['prompt_tokens']} tokens, {d['image_slots']} image "
      f"slot(s), up to {d['max_new_tokens']} new tokens each), per device:",
      f"  whole program     peak {bytes_text(d['whole']['peak_bytes'])} (weights "
      f"{bytes_text(d['whole']['argument_bytes'])}, temporaries {bytes_text(d['whole']['temp_bytes'])}: the KV "
      "cache, activations, logits)",
  ]
  if device_bytes:
    share = d["whole"]["peak_bytes"] / device_bytes
    lines[-1] += f": {share:.0%} of the device's memory" + ("" if share <= 1 else ", does NOT fit")
  for name in ("prefill", "step"):
    part = d[name]
    timing = f", modelled {part['modelled_seconds'] * 1e3:.1f} ms" if part.get("modelled_seconds") else ""
    lines.append(f"  {name:<17} peak {bytes_text(part['peak_bytes'])}{timing}")
  if d.get("modelled_tokens_per_second"):
    lines.append(f"  modelled          {d['modelled_tokens_per_second']:.0f} new tokens/s over the batch; "
                 f"a whole batch at most {d['modelled_batch_seconds']:.2f} s")
  return lines
