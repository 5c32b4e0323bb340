"""Hugging Face causal LMs (Llama, Gemma, Qwen2, Mixtral) <-> mgjax DecoderLM params.

Import reads a Hugging Face folder's config.json into the `model.llm` config section and its
state dict into DecoderLM params; export writes DecoderLM params back as a folder that
transformers' AutoModelForCausalLM loads.

Tensor names are found under whatever prefix the checkpoint uses: `model.` (LlamaForCausalLM
and Mini-Gemini's MGMLlamaForCausalLM / MGMGemmaForCausalLM), `language_model.model.` (older
LLaVA-style wrappers) or `model.language_model.` (current ones). Tensors outside the decoder
(a Mini-Gemini checkpoint's vision towers and projector) are left to their own importer.

Layout changes (HF Linear weights are [out, in]; mgjax kernels are [in, out], per head):
  q/k/v_proj.weight [H*D, E] -> kernel [E, H, D]; bias [H*D] -> [H, D]
  o_proj.weight [E, H*D] -> kernel [H, D, E]
  gate/up_proj.weight [M, E] -> kernel [E, M]; down_proj.weight [E, M] -> kernel [M, E]
  lm_head.weight [V, E] -> kernel [E, V]; embed_tokens.weight and norm weights as they are
(Gemma's norm weight is the offset w of its (1 + w) scale, in both libraries.)
Mixtral, under the names its released checkpoints (and transformers' save_pretrained) use:
  block_sparse_moe.gate.weight [X, E] -> block_sparse_moe/gate/kernel [E, X] (X experts)
  block_sparse_moe.experts.j.w1/w3.weight [M, E] -> row j of block_sparse_moe/experts/w1/w3
    [X, E, M]; experts.j.w2.weight [E, M] -> row j of experts/w2 [X, M, E]
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from mgjax.convert import files

SUPPORTED = ("llama (Llama 1-3, Vicuna, Yi, Mistral without sliding window)", "gemma (Gemma 1)",
             "qwen2 (Qwen2, Qwen2.5)", "mixtral (Mixtral 8x7B, MGM-8x7B; without sliding window)")
_DEFAULT_TIE = {"llama": False, "gemma": True, "qwen2": False, "mixtral": False}
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "gemma": "GemmaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM"
}
# MixtralConfig's defaults, for config.json files that leave the keys out.
_MIXTRAL_EXPERTS, _MIXTRAL_EXPERTS_PER_TOKEN = 8, 2
# Buffers older checkpoints saved although the model recomputes them.
_RECOMPUTED = re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_SHOWN = 40  # tensor names listed per problem kind; the rest are counted


class ConversionError(ValueError):
  """Weights that do not fit the model config; the message names every offending tensor."""


# ------------------------------------------------------------------------------ config.json


def text_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """The language model's part of a config.json (multimodal wrappers nest it as text_config)."""
  nested = hf_config.get("text_config")
  return dict(nested) if isinstance(nested, Mapping) else dict(hf_config)


def detect_family(hf_config: Mapping[str, Any]) -> str:
  """'llama', 'gemma', 'qwen2' or 'mixtral' from config.json's model_type and architectures.

  Raises:
    ConversionError: an architecture mgjax does not implement (the message says which are).
  """
  cfg = text_config(hf_config)
  names = [str(cfg.get("model_type", ""))] + [str(a) for a in cfg.get("architectures") or []]
  if "text_config" in hf_config:
    names += [str(hf_config.get("model_type", ""))] + list(hf_config.get("architectures") or [])
  text = " ".join(names).lower()
  described = f"model_type {cfg.get('model_type')!r}, architectures {cfg.get('architectures')}"
  unsupported = [n for n in ("moe", "gemma2", "gemma3", "qwen2_vl", "qwen2_5_vl", "qwen3") if n in text]
  if unsupported:
    raise ConversionError(f'{described}: {unsupported[0]} models are not implemented in mgjax; '
                          f'supported: {", ".join(SUPPORTED)}')
  if "mixtral" in text:  # MixtralForCausalLM, Mini-Gemini's mgm_mixtral
    return "mixtral"
  if "gemma" in text:
    return "gemma"
  if "qwen2" in text:
    return "qwen2"
  if "mistral" in text and cfg.get("sliding_window"):
    raise ConversionError(f"{described}: sliding-window attention (sliding_window="
                          f"{cfg['sliding_window']}) is not implemented in mgjax")
  if "llama" in text or "mistral" in text or "mgm" in text or "mini_gemini" in text:
    return "llama"
  raise ConversionError(f'{described}: not a decoder mgjax can import; supported: {", ".join(SUPPORTED)}')


def _rope(cfg: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
  """(rope_theta, rope_scaling) from either the transformers 4 keys (rope_theta, rope_scaling)
  or the transformers 5 one (rope_parameters holding both)."""
  params = dict(cfg.get("rope_parameters") or {})
  theta = float(params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
  scaling = dict(cfg.get("rope_scaling") or params)
  scaling.pop("rope_theta", None)
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return theta, None
  scaling["rope_type"] = kind
  scaling.pop("type", None)
  if kind == "llama3":
    scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
  return theta, scaling


def llm_config_from_hf(hf_config: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
  """(the model.llm config section, model.vocab_size) for a config.json.

  Raises:
    ConversionError: an unsupported architecture or option (biases on o_proj or the MLP,
      sliding windows, an activation the family does not use, an unsupported RoPE scaling).
  """
  family = detect_family(hf_config)
  cfg = text_config(hf_config)
  heads = int(cfg["num_attention_heads"])
  theta, scaling = _rope(cfg)
  problems = []
  if cfg.get("attention_bias"):
    problems.append("attention_bias=true (a bias on every attention projection, o_proj included)")
  if cfg.get("mlp_bias"):
    problems.append("mlp_bias=true")
  if family == "qwen2" and cfg.get("use_sliding_window"):
    problems.append("use_sliding_window=true")
  if family == "mixtral" and cfg.get("sliding_window"):
    problems.append(f"sliding_window={cfg['sliding_window']} (sliding-window attention; released "
                    "Mixtral-8x7B configs have null)")
  if family == "mixtral" and cfg.get("router_jitter_noise"):
    problems.append(f"router_jitter_noise={cfg['router_jitter_noise']} (training noise on the router input)")
  act = cfg.get("hidden_activation") or cfg.get("hidden_act") or ("gelu_pytorch_tanh" if family == "gemma" else "silu")
  # Gemma's legacy hidden_act "gelu" means the tanh form (transformers rewrites it so).
  wanted = ("gelu_pytorch_tanh", "gelu_tanh", "gelu") if family == "gemma" else ("silu", "swish")
  if act not in wanted:
    problems.append(f"activation {act!r} ({family} models use {wanted[0]})")
  if scaling and scaling["rope_type"] not in ("llama3", "linear"):
    problems.append(f"rope_scaling type {scaling['rope_type']!r} (supported: llama3, linear)")
  if problems:
    raise ConversionError(f"config.json ({family}): not implemented in mgjax: {'; '.join(problems)}")
  llm = dict(
      family=family,
      hidden=int(cfg["hidden_size"]),
      layers=int(cfg["num_hidden_layers"]),
      heads=heads,
      kv_heads=int(cfg.get("num_key_value_heads") or heads),
      head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
      mlp=int(cfg["intermediate_size"]),
      rope_theta=theta,
      rope_scaling=scaling,
      norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(cfg.get("tie_word_embeddings", _DEFAULT_TIE[family])),
      qkv_bias=family == "qwen2",
      remat="none",
  )
  if family == "mixtral":
    llm.update(
        num_experts=int(cfg.get("num_local_experts") or _MIXTRAL_EXPERTS),
        experts_per_token=int(cfg.get("num_experts_per_tok") or _MIXTRAL_EXPERTS_PER_TOKEN),
        # transformers adds router_aux_loss_coef * aux only with output_router_logits on (the
        # released configs have it off, so Mini-Gemini's MGM-8x7B trained without it): the
        # coefficient a training with this config.json applies.
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef") or 0.0) if cfg.get("output_router_logits") else 0.0,
    )
  return llm, int(cfg["vocab_size"])


def hf_config_from_llm(llm: Mapping[str, Any], vocab_size: int, *, max_position_embeddings: int = 4096,
                       dtype: str = "float32", extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """A config.json for transformers' <Family>ForCausalLM with the same function as `llm`.

  Written in the transformers 4 form (rope_theta, rope_scaling), which transformers 5 also reads.
  extra: keys to add or override (bos_token_id, eos_token_id, ...).
  """
  family = llm.get("family", "llama")
  act = "gelu_pytorch_tanh" if family == "gemma" else "silu"
  out = {
      "architectures": [_ARCHITECTURES[family]],
      "model_type": family,
      "vocab_size": int(vocab_size),
      "hidden_size": int(llm["hidden"]),
      "intermediate_size": int(llm["mlp"]),
      "num_hidden_layers": int(llm["layers"]),
      "num_attention_heads": int(llm["heads"]),
      "num_key_value_heads": int(llm["kv_heads"]),
      "head_dim": int(llm["head_dim"]),
      "hidden_act": act,
      "max_position_embeddings": int(max_position_embeddings),
      "rms_norm_eps": float(llm.get("norm_eps", 1e-5)),
      "rope_theta": float(llm.get("rope_theta", 10000.0)),
      "rope_scaling": dict(llm["rope_scaling"]) if llm.get("rope_scaling") else None,
      "tie_word_embeddings": bool(llm.get("tie_embeddings", False)),
      "attention_bias": False,
      "torch_dtype": dtype,
      "dtype": dtype,
  }
  if family == "gemma":
    out["hidden_activation"] = act
  if family == "llama":
    out["mlp_bias"] = False
  if family == "qwen2":
    out.update(use_sliding_window=False, sliding_window=None)
    del out["attention_bias"]  # Qwen2's q/k/v biases are implied by the architecture
  if family == "mixtral":
    coef = float(llm.get("router_aux_loss_coef") or 0.0)
    out.update(
        num_local_experts=int(llm["num_experts"]),
        num_experts_per_tok=int(llm["experts_per_token"]),
        # on exactly when the coefficient is: transformers then trains with the same loss
        output_router_logits=coef > 0,
        router_aux_loss_coef=coef,
        router_jitter_noise=0.0,
        sliding_window=None)
    del out["attention_bias"]
  out.update(extra or {})
  return out


def check_config_matches(wanted: Mapping[str, Any], found: Mapping[str, Any], *, what: str = "the checkpoint") -> None:
  """Raises ConversionError naming every key where `found` (from a checkpoint) differs from
  `wanted` (the model config the user asked for); remat and other training-only keys aside."""
  keys = ("family", "hidden", "layers", "heads", "kv_heads", "head_dim", "mlp", "rope_theta", "rope_scaling",
          "norm_eps", "tie_embeddings", "qkv_bias", "num_experts", "experts_per_token")
  moe_defaults = {"num_experts": _MIXTRAL_EXPERTS, "experts_per_token": _MIXTRAL_EXPERTS_PER_TOKEN}
  diffs = []
  for k in keys:
    w, f = wanted.get(k), found.get(k)
    if k == "qkv_bias" and w is None:
      continue  # the family's default
    if k in moe_defaults and w is None and wanted.get("family") == "mixtral":
      w = moe_defaults[k]  # DecoderLM's default for the family
    if isinstance(w, Mapping) or isinstance(f, Mapping):
      w, f = dict(w or {}), dict(f or {})
    if isinstance(w, float) and isinstance(f, float) and math.isclose(w, f, rel_tol=1e-6):
      continue  # a value that went through float32 on the way (GGUF keeps 1e-5 as 9.9999997e-06)
    if w != f:
      diffs.append(f"{k}: config {w!r} vs {what} {f!r}")
  if diffs:
    head = ("wrong family: " if wanted.get("family", "llama") != found.get("family") else "")
    raise ConversionError(f"{head}model.llm does not match {what}:\n  " + "\n  ".join(diffs))


# ------------------------------------------------------------------------------ state dict


def _layout(llm: Mapping[str, Any], vocab_size: int) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """{HF name under the decoder prefix (lm_head: 'lm_head.weight'): (HF shape, mgjax path)}."""
  e, h, k, d, m = (int(llm[x]) for x in ("hidden", "heads", "kv_heads", "head_dim", "mlp"))
  family = llm.get("family", "llama")
  bias = llm.get("qkv_bias")
  bias = family == "qwen2" if bias is None else bool(bias)
  out = {
      "embed_tokens.weight": ((vocab_size, e), ("embed_tokens", "embedding")),
      "norm.weight": ((e,), ("norm", "scale"))
  }
  if not llm.get("tie_embeddings", False):
    out["lm_head.weight"] = ((vocab_size, e), ("lm_head", "kernel"))
  for i in range(int(llm["layers"])):
    p = f"layers.{i}."
    out[p + "input_layernorm.weight"] = ((e,), (str(i), "input_layernorm", "scale"))
    out[p + "post_attention_layernorm.weight"] = ((e,), (str(i), "post_attention_layernorm", "scale"))
    for name, n in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
      out[p + f"self_attn.{name}.weight"] = ((n * d, e), (str(i), "self_attn", name, "kernel"))
      if bias:
        out[p + f"self_attn.{name}.bias"] = ((n * d,), (str(i), "self_attn", name, "bias"))
    out[p + "self_attn.o_proj.weight"] = ((e, h * d), (str(i), "self_attn", "o_proj", "kernel"))
    if family == "mixtral":
      # One HF tensor per expert j; its mgjax path ends with j, the row of the stacked weight.
      x = int(llm.get("num_experts") or _MIXTRAL_EXPERTS)
      moe = (str(i), "block_sparse_moe")
      out[p + "block_sparse_moe.gate.weight"] = ((x, e), moe + ("gate", "kernel"))
      for j in range(x):
        for name, shape in (("w1", (m, e)), ("w2", (e, m)), ("w3", (m, e))):
          out[p + f"block_sparse_moe.experts.{j}.{name}.weight"] = (shape, moe + ("experts", name, j))
      continue
    out[p + "mlp.gate_proj.weight"] = ((m, e), (str(i), "mlp", "gate_proj", "kernel"))
    out[p + "mlp.up_proj.weight"] = ((m, e), (str(i), "mlp", "up_proj", "kernel"))
    out[p + "mlp.down_proj.weight"] = ((e, m), (str(i), "mlp", "down_proj", "kernel"))
  return out


def find_prefixes(names: list[str]) -> tuple[str, str | None]:
  """(decoder prefix, lm_head name or None) of a state dict, e.g. ('model.', 'lm_head.weight').

  Raises:
    ConversionError: no embed_tokens.weight (not a decoder checkpoint), or several.
  """
  embeds = sorted(n for n in names if n.endswith("embed_tokens.weight"))
  if len(embeds) != 1:
    sample = ", ".join(sorted(names)[:10])
    raise ConversionError(
        f'expected exactly one *embed_tokens.weight tensor to locate the decoder, found {embeds or "none"}'
        f' (first tensors: {sample})')
  prefix = embeds[0][:-len("embed_tokens.weight")]
  heads = [n for n in names if n == "lm_head.weight" or n.endswith(".lm_head.weight")]
  if len(heads) > 1:
    # The head beside the decoder: 'language_model.lm_head.weight' for 'language_model.model.'.
    outer = prefix[:-len("model.")] if prefix.endswith("model.") else prefix
    heads = [n for n in heads if n == outer + "lm_head.weight"] or heads[:1]
  return prefix, (heads[0] if heads else None)


def _problems(kind: str, items: list[str]) -> list[str]:
  if not items:
    return []
  shown = items[:_SHOWN] + ([f"... and {len(items) - _SHOWN} more"] if len(items) > _SHOWN else [])
  return [f"{kind} ({len(items)}):"] + [f"    {x}" for x in shown]


def _family_hint(unexpected: list[str], missing: list[str]) -> str:
  bias = re.compile(r"\.(q|k|v)_proj\.bias$")
  if any(bias.search(n) for n in unexpected):
    return " The checkpoint has q/k/v biases: a qwen2 model (model.llm.family=qwen2)?"
  if any(bias.search(n) for n in missing):
    return " The checkpoint has no q/k/v biases: not a qwen2 model?"
  if any(".block_sparse_moe." in n for n in unexpected):
    return " The checkpoint has experts (block_sparse_moe): a mixtral model (model.llm.family=mixtral)?"
  if any(".block_sparse_moe." in n for n in missing):
    return " The checkpoint has no experts (block_sparse_moe): not a mixtral model?"
  if any(n.endswith("lm_head.weight") for n in missing):
    return (" The checkpoint has no lm_head: its embeddings are tied (model.llm.tie_embeddings=True;"
            " a gemma model?).")
  return ""


def params_from_hf(tensors: Mapping[str, np.ndarray], llm: Mapping[str, Any], vocab_size: int, *,
                   pad_vocab_to: int | None = None, source: str = "the checkpoint") -> tuple[dict[str, Any], list[str]]:
  """DecoderLM params (a pure dict, float32 numpy) from a Hugging Face state dict.

  Args:
    tensors: name -> array, e.g. files.load_tensors(folder).
    llm: the model.llm config section the params are for.
    vocab_size: the checkpoint's vocabulary (rows of embed_tokens).
    pad_vocab_to: a larger model.vocab_size: the extra rows (tokens added to the tokenizer, such
      as <image>) start as the mean of the existing ones, the usual choice for new tokens.
    source: how error messages name the checkpoint.

  Returns:
    (params, names of the tensors outside the decoder, which were not read).

  Raises:
    ConversionError: listing every missing tensor, wrong shape and unexpected decoder tensor.
  """
  names = list(tensors)
  prefix, head = find_prefixes(names)
  layout = _layout(llm, vocab_size)

  def hf_name(key: str) -> str:
    return (head or "lm_head.weight") if key == "lm_head.weight" else prefix + key

  in_decoder = {
      n for n in names if n.startswith(prefix) and n[len(prefix):].startswith(("layers.", "embed_tokens.", "norm."))
  }
  if head:
    in_decoder.add(head)
  expected = {hf_name(k) for k in layout}
  tied_head = llm.get("tie_embeddings", False) and head is not None
  unexpected = sorted(
      n for n in in_decoder - expected if not _RECOMPUTED.fullmatch(n[len(prefix):]) and not (tied_head and n == head))
  missing = sorted(n for n in expected if n not in tensors)
  wrong = sorted(
      f"{hf_name(k)}: {source} {tuple(tensors[hf_name(k)].shape)} vs config {shape}" for k, (shape,
                                                                                             _) in layout.items()
      if hf_name(k) in tensors and tuple(tensors[hf_name(k)].shape) != shape)
  if missing or wrong or unexpected:
    lines = (_problems("missing tensors", missing) + _problems("wrong shapes", wrong) +
             _problems("unexpected tensors", unexpected))
    raise ConversionError(f"{source} does not fit model.llm (family {llm.get('family', 'llama')!r}, {llm['layers']} "
                          f"layers, vocab {vocab_size}; decoder prefix {prefix!r}):\n  " + "\n  ".join(lines) +
                          _family_hint(unexpected, missing))

  e, h, k, d = (int(llm[x]) for x in ("hidden", "heads", "kv_heads", "head_dim"))
  params: dict[str, Any] = {"layers": {}}
  for key, (_, path) in layout.items():
    w = np.asarray(tensors[hf_name(key)], dtype=np.float32)
    name = path[-2]
    if isinstance(path[-1], int):  # expert j's [out, in] weight: row j of a stacked [X, in, out]
      node = params["layers"].setdefault(int(path[0]), {})
      for part in path[1:-2]:
        node = node.setdefault(part, {})
      node.setdefault(name, {})[path[-1]] = w.T
      continue
    if name in ("q_proj", "k_proj", "v_proj"):
      n = h if name == "q_proj" else k
      w = w.reshape(n, d) if path[-1] == "bias" else w.T.reshape(e, n, d)
    elif name == "o_proj":
      w = w.T.reshape(h, d, e)
    elif path[-1] == "kernel":  # MLP and lm_head: [out, in] -> [in, out]
      w = w.T
    node = params
    if path[0].isdigit():
      node = params["layers"].setdefault(int(path[0]), {})
      path = path[1:]
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.ascontiguousarray(w)
  for layer in params["layers"].values():
    experts = layer.get("block_sparse_moe", {}).get("experts", {})
    for name, rows in experts.items():
      experts[name] = np.ascontiguousarray(np.stack([rows[j] for j in range(len(rows))]))
  if pad_vocab_to and pad_vocab_to > vocab_size:
    _pad_vocab(params, pad_vocab_to - vocab_size)
  elif pad_vocab_to and pad_vocab_to < vocab_size:
    raise ConversionError(f"model.vocab_size {pad_vocab_to} is smaller than {source}'s vocabulary "
                          f"({vocab_size} tokens)")
  unused = sorted(n for n in names if n not in in_decoder and not _RECOMPUTED.fullmatch(n[len(prefix):]))
  if llm.get("scan_layers", False):
    from mgjax.models.llm import stack_layers
    params = stack_layers(params)
  return params, unused


def _pad_vocab(params: dict[str, Any], extra: int) -> None:
  table = params["embed_tokens"]["embedding"]
  params["embed_tokens"]["embedding"] = np.concatenate([table, np.repeat(table.mean(0, keepdims=True), extra, 0)], 0)
  if "lm_head" in params:
    kernel = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = np.concatenate([kernel, np.repeat(kernel.mean(1, keepdims=True), extra, 1)], 1)


def hf_from_params(params: Mapping[str, Any], llm: Mapping[str, Any], *,
                   dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """A Hugging Face <Family>ForCausalLM state dict from DecoderLM params (the inverse of
  params_from_hf), arrays cast to `dtype`."""
  e, h, d = (int(llm[x]) for x in ("hidden", "heads", "head_dim"))
  vocab_size = np.shape(params["embed_tokens"]["embedding"])[0]
  from mgjax.models.llm import is_stacked, unstack_layers
  if is_stacked(params):
    params = unstack_layers(params)
  out = {}
  for key, (_, path) in _layout(llm, vocab_size).items():
    node = params
    if path[0].isdigit():
      layers = params["layers"]
      node = layers[int(path[0])] if int(path[0]) in layers else layers[path[0]]
      path = path[1:]
    for part in path:
      node = node[part]
    w = np.asarray(node, dtype=np.float32)
    name = path[-2]
    if isinstance(path[-1], int):  # row j of a stacked expert weight -> HF's [out, in]
      w = w.T
    elif name in ("q_proj", "k_proj", "v_proj"):
      w = w.reshape(-1) if path[-1] == "bias" else w.reshape(e, -1).T
    elif name == "o_proj":
      w = w.reshape(h * d, e).T
    elif path[-1] == "kernel":
      w = w.T
    name = key if key == "lm_head.weight" else "model." + key
    out[name] = np.ascontiguousarray(w.astype(dtype))
  return out


# ------------------------------------------------------------------------------ folders


def import_hf_llm(path: str, *, allow_pickle: bool = False, llm: Mapping[str, Any] | None = None,
                  pad_vocab_to: int | None = None) -> tuple[dict[str, Any], dict[str, Any], int, list[str]]:
  """Reads a Hugging Face folder into (DecoderLM params, model.llm, model.vocab_size, unused).

  Args:
    path: the folder (config.json and safetensors).
    allow_pickle: also read .bin/.pt/.pth (see files.weight_files).
    llm: the model.llm section the caller's model has; the checkpoint must match it
      (ConversionError naming the keys otherwise). None: take the checkpoint's own.
    pad_vocab_to: a larger model.vocab_size (see params_from_hf).

  Returns:
    params (float32 numpy), the model.llm section, the vocab size of the params, and the names
    of tensors outside the decoder (a Mini-Gemini checkpoint's vision parts).
  """
  found, vocab_size = llm_config_from_hf(files.read_config(path))
  if llm is not None:
    check_config_matches(llm, found, what=f"{path}/config.json")
    found = {**found, "remat": llm.get("remat", "none"), "scan_layers": llm.get("scan_layers", False)}
    if found["family"] == "mixtral" and llm.get("router_aux_loss_coef") is not None:
      found["router_aux_loss_coef"] = float(llm["router_aux_loss_coef"])  # a training choice
  tensors = files.load_tensors(path, allow_pickle=allow_pickle)
  params, unused = params_from_hf(tensors, found, vocab_size, pad_vocab_to=pad_vocab_to, source=path)
  return params, found, max(vocab_size, pad_vocab_to or 0), unused


def export_hf_llm(params: Mapping[str, Any], llm: Mapping[str, Any], out: str, *, dtype: str = "float32",
                  max_shard_bytes: int = 5 * 2**30, max_position_embeddings: int = 4096,
                  extra_config: Mapping[str, Any] | None = None) -> list[str]:
  """Writes DecoderLM params as a folder transformers loads with AutoModelForCausalLM.

  Args:
    params: DecoderLM params (a pure dict; jax or numpy arrays).
    llm: their model.llm config section.
    out: the folder to write (created).
    dtype: 'float32', 'bfloat16' or 'float16' on disk.
    max_shard_bytes: above this, shards with model.safetensors.index.json.
    max_position_embeddings, extra_config: written into config.json.

  Returns:
    The files written.
  """
  np_dtype = {"float32": np.float32, "float16": np.float16}.get(dtype)
  if np_dtype is None:
    import jax.numpy as jnp
    if dtype != "bfloat16":
      raise ValueError(f"dtype {dtype!r}: expected float32, bfloat16 or float16")
    np_dtype = jnp.bfloat16
  tensors = hf_from_params(params, llm, dtype=np_dtype)
  vocab_size = tensors["model.embed_tokens.weight"].shape[0]
  written = files.write_weights(out, tensors, max_shard_bytes=max_shard_bytes)
  config = hf_config_from_llm(llm, vocab_size, max_position_embeddings=max_position_embeddings, dtype=dtype,
                              extra=extra_config)
  config_file = os.path.join(out, files.CONFIG_FILE)
  with open(config_file, "w") as f:
    json.dump(config, f, indent=2)
  return written + [config_file]
