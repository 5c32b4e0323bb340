"""lmms-eval's own command line on mgjax checkpoints, offline, over local tasks made from the
sample's validation records (mgjax.lmms_tasks): its scores must be mgjax's own."""

from __future__ import annotations

import glob
import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from lmms_eval.protocol import ChatMessages
from PIL import Image

from conftest import REPO, tiny_config

from mgjax import decode, likelihood, lmms_model, lmms_tasks, train
from mgjax.data import datasets
from mgjax.evaluators import decoding, understanding

SPLIT = "val_understanding"
# Offline and quiet: lmms-eval, datasets and the hub client must not reach for the network.
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}


def lmms_eval_command(model_args: str, task: str, include: str, out, *extra: str) -> list[str]:
  # DEBUG: lmms-eval's CLI otherwise logs an exception during evaluation and exits 0.
  return [
      sys.executable, "-m", "lmms_eval", "--model", "mgjax", "--model_args", model_args, "--tasks", task,
      "--include_path", include, "--output_path",
      str(out), "--log_samples", "--verbosity", "DEBUG", *extra
  ]


def lmms_eval_env(tmp_path, **extra: str) -> dict[str, str]:
  return {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf_home"), **extra}


def read_output(out, task: str) -> tuple[dict, list[dict]]:
  """lmms-eval's results for `task` and its logged samples, in document order."""
  results = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
  samples = glob.glob(str(out / "**" / f"*_samples_{task}.jsonl"), recursive=True)
  assert len(results) == 1 and len(samples) == 1, (results, samples)
  with open(samples[0]) as f:
    logged = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
  with open(results[0]) as f:
    return json.load(f)["results"][task], logged


def run_lmms_eval(tmp_path, model_args: str, task: str, include: str, *extra: str) -> tuple[dict, list[dict]]:
  """`python -m lmms_eval --model mgjax ...`; its results and its logged samples (doc order)."""
  out = tmp_path / f"out_{task}"
  done = subprocess.run(lmms_eval_command(model_args, task, include, out, *extra), cwd=tmp_path,
                        env=lmms_eval_env(tmp_path), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
  return read_output(out, task)


@pytest.fixture(scope="module")
def val_source(data_dir):
  config = tiny_config(1, data_dir)
  return datasets.open_split(datasets.load_built(config.data.recipe, data_dir), SPLIT)


def test_lmms_eval_scores_a_checkpoint_as_mgjax_evaluation_does(stage1, val_source, tmp_path):
  workdir = stage1.workdir
  generator, config = decode.load_workdir(workdir)
  generator.max_batch_size = config.eval.batch_size  # as the trainer's evaluation decodes
  tasks = tmp_path / "tasks"
  # The task as a user writes it: the run's own split, its eval.max_new_tokens.
  written = subprocess.run(
      [sys.executable, "-m", "mgjax.lmms_tasks", f"--workdir={workdir}", f"--split={SPLIT}", f"--out={tasks}"],
      cwd=REPO, env={
          **os.environ,
          **OFFLINE
      }, capture_output=True, text=True, timeout=300)
  assert written.returncode == 0, written.stderr[-3000:]
  assert f"--tasks {lmms_tasks.task_name(SPLIT)} --include_path {tasks}" in written.stdout

  # mgjax's own evaluation of the same checkpoint and records, at its batch size.
  answers = decoding.AnswerCache(generator, {SPLIT: val_source}, config.eval.max_new_tokens)
  own = understanding.run(answers, config.evals.understanding)[SPLIT]
  assert own["num_answers"] == 11  # 8 records, 3 of them with a second question

  scores, samples = run_lmms_eval(tmp_path, f"workdir={workdir},batch_size={config.eval.batch_size}",
                                  lmms_tasks.task_name(SPLIT), str(tasks))
  assert [s["filtered_resps"] for s in samples] == answers(SPLIT).answers  # answer for answer
  assert [s["target"] for s in samples] == [ref for _, _, ref in answers(SPLIT).turns]
  assert scores["acc,none"] == pytest.approx(own["accuracy"], abs=1e-12)
  # A second turn is asked with the conversation before it, as mgjax's evaluation asks it.
  assert samples[1]["input"] == "Where is the triangle?" and samples[1]["target"] == "Bottom left."


def test_an_answer_scores_as_the_training_loss_on_its_turn(stage1, val_source):
  """mgjax.likelihood's loss of a reference answer is what the train step's loss function
  gives that one-turn conversation, and `greedy` says whether decoding gives the answer."""
  from mgjax import train_step

  generator, _ = decode.load_workdir(stage1.workdir)
  encoder = generator.encoder
  turns = list(decoding.assistant_turns(val_source))
  scores = likelihood.score_answers(generator.graphdef, generator.params, encoder, [t[0] for t in turns],
                                    [t[1] for t in turns], [t[2] for t in turns], num_tokens=len(generator.tokenizer))
  loss_fn = train_step.make_loss_fn(generator.graphdef)
  single_turn = [i for i in range(len(val_source)) if len(val_source[i]["messages"]["role"]) == 2]
  assert len(single_turn) == 5
  k = 0  # index of the record's turn among `turns`
  for i in range(len(val_source)):
    if i in single_turn:
      row = {key: value[None] for key, value in encoder(val_source[i]).items()}
      total, count = loss_fn(generator.params, row)
      assert scores[k].num_tokens == int(count)
      assert scores[k].loss == pytest.approx(float(total) / float(count), rel=1e-5)
    k += len(val_source[i]["messages"]["role"]) // 2
  answers = generator.generate([t[0] for t in turns], [t[1] for t in turns], max_new_tokens=64)
  assert [s.greedy for s in scores] == [a == ref for a, (_, _, ref) in zip(answers, turns)]
  # A wrong answer costs more than the answer greedy decoding gives.
  decoded = likelihood.score_answers(generator.graphdef, generator.params, encoder, [t[0] for t in turns],
                                     [t[1] for t in turns], answers, num_tokens=len(generator.tokenizer))
  assert all(d.greedy for d in decoded if d.num_tokens <= 64)


MULTIPLE_CHOICE_YAML = """
task: mgjax_choice
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: data/test.parquet
test_split: test
output_type: multiple_choice
doc_to_visual: !function mgjax_split_task.doc_to_visual
doc_to_text: !function mgjax_split_task.doc_to_text
doc_to_choice: !function choices.doc_to_choice
doc_to_target: !function choices.doc_to_target
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def hd_run(data_dir, tmp_path_factory):
  """A Mini-Gemini-HD run (a 2x2 grid of low-res views plus a global one per image) with two
  image slots per row: two steps, enough for a checkpoint of that shape."""
  config = tiny_config(1, data_dir, steps=2)
  with config.model.unlocked():
    config.model.image_grid, config.model.image_global = 2, True
  config.data.max_images, config.data.seq_len = 2, 384  # 2 images x 5 views x 16 tokens, and the text
  workdir = tmp_path_factory.mktemp("hd_run")
  train.run(config, str(workdir))
  return str(workdir)


def png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
  out = io.BytesIO()
  Image.new("RGB", size, colour).save(out, format="PNG")
  return out.getvalue()


RED, BLUE = png((220, 30, 30), (96, 64)), png((30, 30, 220), (48, 80))
IMAGE_QUESTIONS = [
    {
        "id": b"two_images",
        "messages": {
            "role": [b"user", b"assistant"],
            "content": [b"<image>\n<image>\nAre the two squares the same colour?", b"No."]
        },
        "images": [RED, BLUE],
    },
    {
        "id": b"one_image",
        "messages": {
            "role": [b"user", b"assistant"],
            "content": [b"<image>\nWhat colour is the square?", b"Blue."]
        },
        "images": [BLUE],
    },
]


@pytest.fixture(scope="module")
def simple_interface_run(hd_run, val_source, tmp_path_factory):
  """One lmms-eval run with --force_simple (the interface multiple-choice tasks need) on the
  HD checkpoint: a multiple-choice task over the sample's understanding questions, and
  questions about one and two images."""
  tmp_path = tmp_path_factory.mktemp("simple_interface")
  tasks = tmp_path / "tasks"
  folder = lmms_tasks.write_task(val_source, SPLIT, str(tasks), max_new_tokens=8)
  choices = sorted({ref for _, _, ref in decoding.assistant_turns(val_source) if len(ref) < 20})
  assert len(choices) >= 4
  with open(os.path.join(folder, "mgjax_choice.yaml"), "w") as f:
    f.write(MULTIPLE_CHOICE_YAML)
  with open(os.path.join(folder, "choices.py"), "w") as f:
    f.write(f"CHOICES = {choices!r}\n\n\ndef doc_to_choice(doc):\n  return CHOICES\n\n\n"
            "def doc_to_target(doc):\n  return CHOICES.index(doc['answer']) if doc['answer'] in CHOICES else 0\n")
  lmms_tasks.write_task(IMAGE_QUESTIONS, "val_hd", str(tasks), max_new_tokens=12)
  out = tmp_path / "out"
  names = ["mgjax_choice", lmms_tasks.task_name("val_hd")]
  done = subprocess.run(
      lmms_eval_command(f"workdir={hd_run},batch_size=16", ",".join(names), str(tasks), out, "--force_simple"),
      cwd=tmp_path, env=lmms_eval_env(tmp_path), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
  return {"choices": choices, **{name: read_output(out, name) for name in names}}


def test_multiple_choice_through_lmms_eval_picks_the_likeliest_answer(simple_interface_run, hd_run, val_source):
  """lmms-eval's loglikelihood requests, scored by mgjax.likelihood."""
  scores, samples = simple_interface_run["mgjax_choice"]
  choices = simple_interface_run["choices"]
  generator, _ = decode.load_workdir(hd_run)
  picked = []
  for (_, images, ref), sample in zip(decoding.assistant_turns(val_source), samples, strict=True):
    question = sample["input"]  # a simple model's context: the last question alone
    conversation, files = lmms_model.simple_conversation(question, [Image.open(io.BytesIO(b)) for b in images])
    own = likelihood.score_answers(generator.graphdef, generator.params, generator.encoder,
                                   [conversation] * len(choices), [files] * len(choices), choices,
                                   num_tokens=len(generator.tokenizer))
    losses = [s.loss for s in own]
    logged = [float(loss) for loss, _ in sample["filtered_resps"]]
    np.testing.assert_allclose(logged, losses, rtol=1e-5)
    picked.append(float(choices[int(np.argmin(losses))] == ref))
  assert scores["acc,none"] == pytest.approx(np.mean(picked), abs=1e-12)


def test_an_hd_checkpoint_answers_a_two_image_question_through_lmms_eval(simple_interface_run, hd_run):
  _, samples = simple_interface_run[lmms_tasks.task_name("val_hd")]
  generator, _ = decode.load_workdir(hd_run, max_batch_size=16)
  assert generator.encoder.num_image_tokens == 5 * 16  # the HD layout reached the model
  own = generator.generate([[{
      "role": "user",
      "content": r["messages"]["content"][0].decode()
  }] for r in IMAGE_QUESTIONS], [r["images"] for r in IMAGE_QUESTIONS], max_new_tokens=12)
  assert [s["filtered_resps"] for s in samples] == own


def test_chat_messages_put_each_image_where_the_task_put_it():
  """The chat interface's messages as mgjax's conversation: an image item becomes <image>,
  followed by a newline unless its text starts with one (Mini-Gemini's "<image>\\n" + question)."""
  red, blue = Image.open(io.BytesIO(RED)), Image.open(io.BytesIO(BLUE))
  messages = ChatMessages(messages=[
      {
          "role": "user",
          "content": [{
              "type": "image",
              "url": red
          }, {
              "type": "image",
              "url": blue
          }, {
              "type": "text",
              "text": "Same colour?"
          }]
      },
      {
          "role": "assistant",
          "content": [{
              "type": "text",
              "text": "No."
          }]
      },
      {
          "role": "user",
          "content": [{
              "type": "text",
              "text": "And this one:"
          }, {
              "type": "image",
              "url": RED
          }, {
              "type": "text",
              "text": "\nis it red?"
          }]
      },
  ])
  conversation, files = lmms_model.chat_conversation(messages)
  assert conversation == [
      {
          "role": "user",
          "content": "<image>\n<image>\nSame colour?"
      },
      {
          "role": "assistant",
          "content": "No."
      },
      {
          "role": "user",
          "content": "And this one:<image>\nis it red?"
      },
  ]
  assert files == [red, blue, RED]
  with pytest.raises(ValueError, match="text and images only"):
    lmms_model.chat_conversation(
        ChatMessages(messages=[{
            "role": "user",
            "content": [{
                "type": "video",
                "url": "a.mp4"
            }]
        }]))


def test_two_processes_answer_through_lmms_eval_as_one_process_over_the_same_devices(stage1, val_source, tmp_path):
  """lmms-eval started on two hosts (here two processes of 4 CPU devices each, through
  jax.distributed): the params and each batch split over all 8 devices, one SPMD program;
  both processes report what one process over 8 devices decodes."""
  lmms_tasks.write_task(val_source, SPLIT, str(tmp_path / "tasks"), max_new_tokens=8)
  task, address = lmms_tasks.task_name(SPLIT), f"localhost:{free_port()}"
  env = lmms_eval_env(tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  processes = [
      subprocess.Popen(
          lmms_eval_command(
              f"workdir={stage1.workdir},batch_size=8,distributed=true,coordinator_address={address},"
              f"num_processes=2,process_id={i}", task, str(tmp_path / "tasks"), tmp_path / f"out{i}"), cwd=tmp_path,
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=600)[0] for p in processes]
  finally:
    for p in processes:
      p.kill()
  assert all(p.returncode == 0 for p in processes), "\n".join(out[-3000:] for out in outputs)
  answers = [[s["filtered_resps"] for s in read_output(tmp_path / f"out{i}", task)[1]] for i in range(2)]

  generator, _ = decode.load_workdir(stage1.workdir, sharded=True, max_batch_size=8)
  assert generator.mesh.devices.size == 8
  turns = list(decoding.assistant_turns(val_source))
  own = generator.generate([t[0] for t in turns], [t[1] for t in turns], max_new_tokens=8)
  assert answers[0] == answers[1] == own


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]
