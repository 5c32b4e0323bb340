"""Weights for the vision side of Mini-Gemini: towers, patch info mining and projector.

Sources, as users download them:
- CLIP / SigLIP: a Hugging Face folder of CLIPModel, CLIPVisionModel, SiglipModel or
  SiglipVisionModel. Older files name the tower's tensors `vision_model.embeddings...`,
  transformers 5 saves a bare vision model as `embeddings...`; both load.
- ConvNeXt: timm weights (`stem.0.weight`, `stages.1.downsample.1.weight`, ...) or an
  OpenCLIP model file (the same under `visual.trunk.`), e.g. the
  convnext_large_d_320 laion2B-s29B-b131K-ft-soup release that Mini-Gemini uses.
- A Mini-Gemini checkpoint (YanweiLi/MGM-*): mining and projector tensors as MGM names
  them (`model.vlm_uni_{query,aux,val}_projector.{0,1}.*`, `model.mm_projector.{0,2}.*`)
  and, where it saved them, the towers (`model.vision_tower.vision_tower.vision_model.*`,
  `model.vision_tower_aux.vision_{stem,stages}.*`).

Each importer finds where a tower's tensors start in the file (the prefix), converts
torch layouts to mgjax's (Linear [out, in] -> kernel [in, out], Conv [O, I, kh, kw] ->
[kh, kw, I, O], attention projections split per head) and writes them into an nnx module.
Any mismatch with the module's config stops the import with a CheckpointMismatch naming
every missing tensor, unexpected tensor and wrong shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgjax.convert.llm_weights import ConversionError
from mgjax.models.mining import PatchInfoMining, Projector
from mgjax.models.vision import ConvNeXt, VisionTransformer

# Converters from a torch tensor to an mgjax parameter of shape `target`.
Convert = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]


def _copy(x, target):
  return x.reshape(target) if x.size == int(np.prod(target)) else x


def _linear(x, target):  # torch Linear weight [out, in] -> kernel [in, out]
  return x.T if x.ndim == 2 else x


def _heads_in(x, target):  # [heads * head_dim, width] -> [width, heads, head_dim]
  return x.T.reshape(target) if x.ndim == 2 and x.size == int(np.prod(target)) else x


def _heads_out(x, target):  # [width, heads * head_dim] -> [heads, head_dim, width]
  return x.T.reshape(target) if x.ndim == 2 and x.size == int(np.prod(target)) else x


def _conv(x, target):  # torch Conv2d [O, I, kh, kw] -> [kh, kw, I, O]
  return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x


class CheckpointMismatch(ConversionError):
  """Weights that do not fit the model config: names every tensor that does not fit."""


def _listed(names: list[str], limit: int = 12) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def find_prefix(tensors: Iterable[str], marker: str, what: str, source: str) -> str:
  """The prefix before `marker` in the tensor names (shortest first), e.g. 'vision_model.'
  for marker 'embeddings.patch_embedding.weight'."""
  hits = sorted((n[:-len(marker)] for n in tensors if n.endswith(marker)), key=len)
  if not hits:
    names = sorted(tensors)
    raise CheckpointMismatch(f'{source}: no {what} here: no tensor named *{marker}; the file holds '
                             f'{_listed(names, 6) or "no tensors"}')
  return hits[0]


def assign(module: nnx.Module, rules: Mapping[str, tuple[str, Convert]], tensors: Mapping[str, np.ndarray], *,
           source: str, prefix: str = "", ignore: Iterable[str] = (), dtype=jnp.float32) -> None:
  """Writes tensors[prefix + name] into each parameter of `module` that `rules` maps.

  Args:
    module: the nnx module to fill (concrete, already built from the config).
    rules: '/'-joined parameter path -> (tensor name after the prefix, converter).
    tensors: the checkpoint, by tensor name.
    source: the file or folder, for messages.
    prefix: where this module's tensors start in the checkpoint's names.
    ignore: regexes over names (after the prefix) that the module does not use.
    dtype: the parameters' dtype.

  Raises:
    CheckpointMismatch: a parameter with no rule, a missing tensor, a tensor under the
      prefix that no rule reads and `ignore` does not cover, or a shape that the config
      does not give; all of them named in one message.
  """
  ignore_re = [re.compile(p) for p in ignore]
  params = nnx.to_flat_state(nnx.state(module, nnx.Param))
  updates, missing, wrong, unmapped, used = [], [], [], [], set()
  for path, var in params:
    key = "/".join(map(str, path))
    if key not in rules:
      unmapped.append(key)
      continue
    name, convert = rules[key]
    full = prefix + name
    if full not in tensors:
      missing.append(full)
      continue
    used.add(full)
    source_array = np.asarray(tensors[full])
    value = convert(source_array, tuple(var.shape))
    if tuple(value.shape) != tuple(var.shape):
      wrong.append(f"{full} {tuple(source_array.shape)} (config expects {key} "
                   f"{tuple(var.shape)})")
      continue
    updates.append((path, jnp.asarray(value, dtype)))
  unexpected = sorted(
      n for n in tensors
      if n.startswith(prefix) and n not in used and not any(r.fullmatch(n[len(prefix):]) for r in ignore_re))
  problems = []
  if missing:
    problems.append(f"missing tensors: {_listed(sorted(missing))}")
  if wrong:
    problems.append(f"wrong shapes: {_listed(wrong)}")
  if unexpected:
    problems.append(f"unexpected tensors: {_listed(unexpected)}")
  if unmapped:  # a model change without an importer change; not the user's fault
    problems.append(f"parameters with no source tensor rule: {_listed(unmapped)}")
  if problems:
    raise CheckpointMismatch(f"{source} does not match the {type(module).__name__} of this config "
                             f"(prefix '{prefix}'): " + "; ".join(problems))
  state = nnx.state(module, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  for path, value in updates:
    flat[path].set_value(value)
  nnx.update(module, state)


# ---------------------------------------------------------------- CLIP / SigLIP ViT


def vit_rules(vit: VisionTransformer) -> dict[str, tuple[str, Convert]]:
  """mgjax ViT parameter paths -> HF CLIP/SigLIP vision tensor names (no prefix)."""
  rules = {
      "patch_embedding/kernel": ("embeddings.patch_embedding.weight", _conv),
      "patch_embedding/bias": ("embeddings.patch_embedding.bias", _copy),
      "class_embedding": ("embeddings.class_embedding", _copy),
      "position_embedding/embedding": ("embeddings.position_embedding.weight", _copy),
      "pre_layernorm/scale": ("pre_layrnorm.weight", _copy),  # sic: HF's spelling
      "pre_layernorm/bias": ("pre_layrnorm.bias", _copy),
  }
  for i in range(len(vit.layers)):
    ours, theirs = f"layers/{i}", f"encoder.layers.{i}"
    for norm in ("layer_norm1", "layer_norm2"):
      rules[f"{ours}/{norm}/scale"] = (f"{theirs}.{norm}.weight", _copy)
      rules[f"{ours}/{norm}/bias"] = (f"{theirs}.{norm}.bias", _copy)
    for proj in ("q_proj", "k_proj", "v_proj"):
      rules[f"{ours}/self_attn/{proj}/kernel"] = (f"{theirs}.self_attn.{proj}.weight", _heads_in)
      rules[f"{ours}/self_attn/{proj}/bias"] = (f"{theirs}.self_attn.{proj}.bias", _copy)
    rules[f"{ours}/self_attn/out_proj/kernel"] = (f"{theirs}.self_attn.out_proj.weight", _heads_out)
    rules[f"{ours}/self_attn/out_proj/bias"] = (f"{theirs}.self_attn.out_proj.bias", _copy)
    for fc in ("fc1", "fc2"):
      rules[f"{ours}/mlp/{fc}/kernel"] = (f"{theirs}.mlp.{fc}.weight", _linear)
      rules[f"{ours}/mlp/{fc}/bias"] = (f"{theirs}.mlp.{fc}.bias", _copy)
  return rules


# Tensors of a vision model that no feature layer reads: the final norm, SigLIP's pooling
# head, and the position_ids buffer older transformers saved.
VIT_UNUSED = (r"post_layernorm\..*", r"head\..*", r"embeddings\.position_ids")


def load_vit(vit: VisionTransformer, tensors: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> None:
  """Fills a CLIP or SigLIP ViT from HF tensors (any prefix: '', 'vision_model.', ...)."""
  prefix = find_prefix(tensors, "embeddings.patch_embedding.weight", f"{vit.kind} vision tower", source)
  assign(vit, vit_rules(vit), tensors, source=source, prefix=prefix, ignore=VIT_UNUSED)


# ---------------------------------------------------------------- ConvNeXt (timm / OpenCLIP)


def convnext_rules(net: ConvNeXt, *, stem: str = "stem", stages: str = "stages") -> dict[str, tuple[str, Convert]]:
  """mgjax ConvNeXt parameter paths -> timm tensor names (MGM saves stem/stages as
  vision_stem/vision_stages)."""
  rules = {
      "stem_conv/kernel": (f"{stem}.0.weight", _conv),
      "stem_conv/bias": (f"{stem}.0.bias", _copy),
      "stem_norm/scale": (f"{stem}.1.weight", _copy),
      "stem_norm/bias": (f"{stem}.1.bias", _copy),
  }
  for i, stage in enumerate(net.stages):
    ours, theirs = f"stages/{i}", f"{stages}.{i}"
    if stage.downsample_conv is not None:
      rules[f"{ours}/downsample_norm/scale"] = (f"{theirs}.downsample.0.weight", _copy)
      rules[f"{ours}/downsample_norm/bias"] = (f"{theirs}.downsample.0.bias", _copy)
      rules[f"{ours}/downsample_conv/kernel"] = (f"{theirs}.downsample.1.weight", _conv)
      rules[f"{ours}/downsample_conv/bias"] = (f"{theirs}.downsample.1.bias", _copy)
    for j in range(len(stage.blocks)):
      o, t = f"{ours}/blocks/{j}", f"{theirs}.blocks.{j}"
      rules[f"{o}/conv_dw/kernel"] = (f"{t}.conv_dw.weight", _conv)
      rules[f"{o}/conv_dw/bias"] = (f"{t}.conv_dw.bias", _copy)
      rules[f"{o}/norm/scale"] = (f"{t}.norm.weight", _copy)
      rules[f"{o}/norm/bias"] = (f"{t}.norm.bias", _copy)
      for fc in ("fc1", "fc2"):
        rules[f"{o}/mlp/{fc}/kernel"] = (f"{t}.mlp.{fc}.weight", _linear)
        rules[f"{o}/mlp/{fc}/bias"] = (f"{t}.mlp.{fc}.bias", _copy)
      rules[f"{o}/gamma"] = (f"{t}.gamma", _copy)
  return rules


# timm's classifier head and pre-head norm: OpenCLIP replaces the head, MGM drops both.
CONVNEXT_UNUSED = (r"head\..*", r"norm_pre\..*")


def load_convnext(net: ConvNeXt, tensors: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> None:
  """Fills the ConvNeXt trunk from timm names, OpenCLIP's (`visual.trunk.`) or MGM's."""
  names = list(tensors)
  if any(n.endswith("vision_stem.0.weight") for n in names):  # a Mini-Gemini checkpoint
    prefix = find_prefix(names, "vision_stem.0.weight", "ConvNeXt tower", source)
    rules = convnext_rules(net, stem="vision_stem", stages="vision_stages")
  else:
    prefix = find_prefix(names, "stem.0.weight", "ConvNeXt tower", source)
    rules = convnext_rules(net)
  assign(net, rules, tensors, source=source, prefix=prefix, ignore=CONVNEXT_UNUSED)


# ---------------------------------------------------------------- MGM mining + projector


def mining_rules() -> dict[str, tuple[str, Convert]]:
  """PatchInfoMining paths -> MGM's nn.Sequential(LayerNorm, Linear) names."""
  rules = {}
  for ours, theirs in (("query_projector", "vlm_uni_query_projector"), ("key_projector", "vlm_uni_aux_projector"),
                       ("value_projector", "vlm_uni_val_projector")):
    rules[f"{ours}/norm/scale"] = (f"{theirs}.0.weight", _copy)
    rules[f"{ours}/norm/bias"] = (f"{theirs}.0.bias", _copy)
    rules[f"{ours}/linear/kernel"] = (f"{theirs}.1.weight", _linear)
    rules[f"{ours}/linear/bias"] = (f"{theirs}.1.bias", _copy)
  return rules


def projector_rules() -> dict[str, tuple[str, Convert]]:
  """Projector paths -> MGM's mlp2x_gelu nn.Sequential(Linear, GELU, Linear) names."""
  return {
      "linear_1/kernel": ("mm_projector.0.weight", _linear),
      "linear_1/bias": ("mm_projector.0.bias", _copy),
      "linear_2/kernel": ("mm_projector.2.weight", _linear),
      "linear_2/bias": ("mm_projector.2.bias", _copy)
  }


def load_mining(mining: PatchInfoMining, tensors: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> None:
  prefix = find_prefix(tensors, "vlm_uni_query_projector.0.weight", "patch info mining", source)
  rules = mining_rules()
  # Only the mining tensors live under 'model.' alongside the whole LLM: select them.
  wanted = {prefix + name for name, _ in rules.values()}
  picked = {n: a for n, a in tensors.items() if n in wanted or n.startswith(prefix + "vlm_uni_")}
  assign(mining, rules, picked, source=source, prefix=prefix)


def load_projector(projector: Projector, tensors: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> None:
  prefix = find_prefix(tensors, "mm_projector.0.weight", "mm_projector (mlp2x_gelu)", source)
  picked = {n: a for n, a in tensors.items() if n.startswith(prefix + "mm_projector.")}
  assign(projector, projector_rules(), picked, source=source, prefix=prefix)


def has_tensor_ending(tensors: Iterable[str], marker: str) -> bool:
  return any(n.endswith(marker) for n in tensors)
