"""`python -m mgjax.predict` on a real (tiny, briefly trained) workdir: the CLI's plumbing.

The answers of a model trained for a few steps are gibberish; what is checked is that the
command answers exactly what mgjax.decode.Generator answers for the same conversation.
Each command starts Python and JAX and compiles the decoder (~20 s here without a warm
cache): they share conftest.py's persistent compilation cache.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO, tiny_config
from mgjax import decode, train

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def workdir(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("stage1"))
  train.run(tiny_config(1, data_dir, steps=3), workdir)
  return workdir


@pytest.fixture(scope="module")
def generator(workdir):
  return decode.load_workdir(workdir)[0]


@pytest.fixture(scope="module")
def cache():
  return os.environ["JAX_COMPILATION_CACHE_DIR"]  # conftest.py's, shared with in-process compiles


def predict(workdir: str, cache: str, *flags: str, stdin: str | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([
      sys.executable, "-m", "mgjax.predict", f"--workdir={workdir}", f"--compilation_cache={cache}",
      f"--max_new_tokens={MAX_NEW_TOKENS}", *flags
  ], cwd=REPO, input=stdin, capture_output=True, text=True, timeout=600)


def shown(answer: str) -> str:
  """What the CLI prints for one answer."""
  image_prompt = decode.extract_image_prompt(answer)
  return answer + "\n" + (f"text-to-image prompt: {image_prompt}\n" if image_prompt is not None else "")


def answer(generator, messages, images=()):
  return generator.generate([messages], [list(images)], max_new_tokens=MAX_NEW_TOKENS)[0]


def test_prompt_with_and_without_an_image(workdir, generator, data_dir, cache):
  prompt = "Draw two red circles on a white background. <GEN>"
  result = predict(workdir, cache, f"--prompt={prompt}")
  assert result.returncode == 0, result.stderr
  assert result.stdout == shown(answer(generator, [{"role": "user", "content": prompt}]))

  image = os.path.join(data_dir, "sample_sources", "images", "shapes_00000.png")
  question = "How many circles are there?"
  result = predict(workdir, cache, f"--prompt={question}", f"--image={image}")
  assert result.returncode == 0, result.stderr
  with open(image, "rb") as f:
    expected = answer(generator, [{"role": "user", "content": f"<image>\n{question}"}], [f.read()])
  assert result.stdout == shown(expected)


def test_chat_keeps_history_until_reset_and_quits(workdir, generator, cache):
  result = predict(workdir, cache, "--chat", stdin="hello\nand then?\n/reset\nhi\n/quit\nnever read\n")
  assert result.returncode == 0, result.stderr
  first = answer(generator, [{"role": "user", "content": "hello"}])
  second = answer(generator, [{
      "role": "user",
      "content": "hello"
  }, {
      "role": "assistant",
      "content": first
  }, {
      "role": "user",
      "content": "and then?"
  }])
  after_reset = answer(generator, [{"role": "user", "content": "hi"}])
  assert result.stdout == shown(first) + shown(second) + "(conversation reset)\n" + shown(after_reset)


def test_untrained_workdir_says_what_to_run(tmp_path, cache):
  for workdir in (tmp_path / "missing", tmp_path):  # absent, and present but empty
    result = predict(str(workdir), cache, "--prompt=hi")
    assert result.returncode != 0
    assert f"python -m mgjax.main --config=configs/stage1.py --workdir={workdir}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is not None, reason="diffusers is installed")
def test_t2i_without_diffusers_is_a_clear_error(tmp_path, cache):
  # Checked before anything loads, so no trained workdir is needed to see it.
  result = predict(str(tmp_path), cache, "--prompt=hi", "--t2i_pipeline=some/pipeline")
  assert result.returncode != 0
  assert "pip install diffusers" in result.stderr and "Traceback" not in result.stderr
