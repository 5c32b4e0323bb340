"""Every LLM family against transformers (torch, float32) on tiny random models.

Each model is saved with save_pretrained and imported with load_hf_lm, so these tests cover
the family's forward pass and its weight mapping together: logits within 1e-4 (max abs).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mgjax.convert import load_hf_lm  # noqa: E402
from mgjax.models.llm import DecoderLM  # noqa: E402

VOCAB = 128
TOLERANCE = 1e-4
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
# name -> (config class, extra config). Sizes are tiny; Gemma's head_dim is not hidden/heads,
# and the Llama-3 context (16) is short enough that its 24-token inputs reach every branch of
# the scaling (kept, blended and slowed frequencies).
FAMILIES = {
    "llama": ("LlamaConfig", dict()),
    "llama3": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE)),
    "gemma": ("GemmaConfig", dict(head_dim=16)),
    "qwen2": ("Qwen2Config", dict()),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
}


def tiny_hf_model(name: str, seed: int = 0):
  """A random transformers model of FAMILIES[name] in float32, eval mode.

  Every weight is drawn afresh (norm weights around their identity value, biases non-zero),
  so a mapping that swapped or dropped any of them would show in the logits.
  """
  cls, extra = FAMILIES[name]
  cfg = getattr(transformers, cls)(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
  gemma = cfg.model_type == "gemma"
  with torch.no_grad():
    for pname, p in model.named_parameters():
      identity = 1.0 if (p.ndim == 1 and "norm" in pname and not gemma) else 0.0
      p.copy_(torch.randn_like(p) * 0.2 + identity)
  return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.float().numpy()


def random_ids(batch: int = 2, seq: int = 24, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int32)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  """name -> (transformers model, its saved folder, the imported mgjax model), built on first use."""
  built = {}

  def get(name):
    if name not in built:
      hf = tiny_hf_model(name)
      folder = str(tmp_path_factory.mktemp(name))
      hf.save_pretrained(folder)
      built[name] = (hf, folder, load_hf_lm(folder))
    return built[name]

  return get


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_match_transformers(cases, name):
  hf, _, model = cases(name)
  ids = random_ids()
  ours = np.asarray(model(ids))
  ref = hf_logits(hf, ids)
  assert ours.dtype == np.float32 and ours.shape == (2, 24, VOCAB)
  diff = np.abs(ours - ref).max()
  print(f"{name}: max abs logit difference {diff:.2e}")
  assert diff < TOLERANCE, f"{name}: max abs difference {diff}"


def test_llama3_rope_scaling_is_applied(cases):
  """The llama3 model's parity is due to its scaling: without it the logits differ."""
  hf, _, model = cases("llama3")
  assert model.layers[0].self_attn.rope_inv_freq != DecoderLM(vocab_size=VOCAB, hidden=32, layers=1, heads=4,
                                                              kv_heads=2, head_dim=8, mlp=64, rope_theta=500000.0,
                                                              rngs=nnx.Rngs(0)).layers[0].self_attn.rope_inv_freq
  graphdef, state = nnx.split(model)
  unscaled = nnx.merge(
      nnx.split(
          DecoderLM(vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp=64, rope_theta=500000.0,
                    norm_eps=model.norm.eps, rngs=nnx.Rngs(0)))[0], state)
  ids = random_ids()
  assert np.abs(np.asarray(unscaled(ids)) - hf_logits(hf, ids)).max() > 1e-3


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_kv_cache_decode_equals_the_full_forward(cases, name):
  """Prefill a left-padded prompt, then decode token by token: each step's logits equal the
  no-cache forward over the whole (unpadded) row."""
  _, _, model = cases(name)
  ids = random_ids(seq=12, seed=1)
  lengths = (5, 8)
  prompt_len = 8
  mask = np.arange(prompt_len)[None] >= prompt_len - np.array(lengths)[:, None]
  # Row r's real tokens: ids[r, :lengths[r]] then the continuation ids[r, lengths[r]:...].
  prompt = np.zeros((2, prompt_len), np.int32)
  for r, n in enumerate(lengths):
    prompt[r, prompt_len - n:] = ids[r, :n]
  extend = nnx.jit(lambda m, x, mask, cache: m.extend(x, token_mask=mask, cache=cache))
  cache = model.init_cache(2, prompt_len + 4)
  logits, cache = extend(model, prompt, mask, cache)
  steps = [np.asarray(logits[:, -1])]
  fed = [[], []]
  for t in range(3):
    nxt = np.array([ids[r, n + t] for r, n in enumerate(lengths)], np.int32)
    for r in range(2):
      fed[r].append(int(nxt[r]))
    logits, cache = extend(model, nxt[:, None], np.ones((2, 1), bool), cache)
    steps.append(np.asarray(logits[:, -1]))
  for r, n in enumerate(lengths):
    full = np.asarray(model(ids[r:r + 1, :n + 3]))[0]
    for t, step in enumerate(steps):
      diff = np.abs(step[r] - full[n - 1 + t]).max()
      assert diff < TOLERANCE, f"{name}: row {r} step {t}: cache vs full forward differ by {diff}"


def test_bfloat16_compute_stays_close(cases):
  """A bf16 model of the same weights gives float32 logits near the float32 ones (one family:
  the dtype plumbing is shared)."""
  _, folder, model = cases("gemma")
  low = load_hf_lm(folder, dtype=jnp.bfloat16)
  ids = random_ids()
  out = low(ids)
  assert out.dtype == jnp.float32
  assert np.abs(np.asarray(out) - np.asarray(model(ids))).max() < 0.25
  assert jax.tree.leaves(nnx.state(low, nnx.Param))[0].dtype == jnp.float32
