"""Hugging Face / timm weights <-> mgjax params.

  from mgjax.convert import load_hf_lm
  model = load_hf_lm('path/to/Llama-3-8B-Instruct')   # a local Hugging Face folder
  logits = model(input_ids)                            # float32 [batch, seq, vocab]

files.py reads and writes the weight files, llm_weights.py maps decoder LMs; the command line
(`python -m mgjax.convert --help`) writes checkpoints the trainer starts from.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.convert.files import WeightsError, load_tensors, read_config
from mgjax.convert.llm_weights import ConversionError, export_hf_llm, import_hf_llm, llm_config_from_hf
from mgjax.models.llm import DecoderLM

__all__ = [
    "ConversionError", "WeightsError", "export_hf_llm", "import_hf_llm", "llm_config_from_hf", "load_hf_lm",
    "load_tensors", "read_config"
]


def load_hf_lm(path: str, *, dtype: Any = jnp.float32, allow_pickle: bool = False) -> DecoderLM:
  """A DecoderLM holding the weights of a local Hugging Face causal-LM folder.

  The folder is what `hf download REPO_ID --local-dir=DIR` or `save_pretrained` leaves: config.json and
  model.safetensors (or shards with model.safetensors.index.json) of a Llama, Gemma or Qwen2
  model, or a Mini-Gemini checkpoint (its decoder is read, its vision parts are ignored).
  Nothing is fetched from the network.

  Args:
    path: the folder.
    dtype: compute dtype; params are kept in float32 and logits are always float32.
    allow_pickle: also read pickle checkpoints (.bin/.pt/.pth) with torch.load(weights_only=True).

  Returns:
    The model: `model(input_ids)` with int input_ids [batch, seq] gives float32 logits
    [batch, seq, vocab]; `model.init_cache` / `model.extend` decode with a KV cache.

  Raises:
    WeightsError: the folder, its config.json or its weights are missing or refused.
    ConversionError: an unsupported architecture, or weights that do not fit config.json
      (the message names every tensor).
  """
  params, llm, vocab_size, _ = import_hf_llm(path, allow_pickle=allow_pickle)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: DecoderLM(vocab_size=vocab_size, **llm, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)
