"""Ask a trained workdir: one prompt, or an interactive chat.

  python -m mgjax.predict --workdir=runs/stage2 --prompt="Draw a red circle on a white background. <GEN>"
  python -m mgjax.predict --workdir=runs/stage1 --image=photo.png --prompt="How many circles are there?"
  python -m mgjax.predict --workdir=runs/stage2 --chat [--image=photo.png]

The workdir's result checkpoint is used (the best one when early stopping chose it), with
the tokenizer saved in WORKDIR/tokenizer and the model config the run trained with
(mgjax.decode.load_workdir, which evaluation code can call too). The
answer goes to stdout; when it holds a text-to-image prompt (<h>...</h>, Mini-Gemini's
generation convention) that prompt follows on its own line, labelled. With
--t2i_pipeline=DIR (needs `pip install diffusers`) the prompt is also drawn to a PNG.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Callable

from absl import app, flags
from absl import logging as absl_logging
from etils import epath

from mgjax import checkpoint, decode, runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained workdir (or one of its checkpoints/<step> folders).")
_PROMPT = flags.DEFINE_string("prompt", None, "The user's message (not with --chat).")
_IMAGE = flags.DEFINE_string("image", None, "An image file the message is about (with --chat: for the first turn).")
_CHAT = flags.DEFINE_bool("chat", False,
                          "Chat interactively: one message per stdin line; /reset starts over, /quit ends.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "The most tokens per answer.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 answers greedily; above 0 samples at this temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "When sampling: only among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "When sampling: only among the most likely tokens holding this probability.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_T2I_PIPELINE = flags.DEFINE_string(
    "t2i_pipeline", None, "A diffusers text-to-image pipeline (folder or hub name) to draw extracted prompts with.")
_T2I_OUTPUT = flags.DEFINE_string("t2i_output", "t2i.png",
                                  "Where --t2i_pipeline saves the image (in a chat: NAME-<turn>.png).")
flags.mark_flags_as_required(["workdir"])

IMAGE_PROMPT_LABEL = "text-to-image prompt:"


def format_answer(answer: str) -> str:
  """What the CLI prints for an answer: it, then its text-to-image prompt if it holds one."""
  image_prompt = decode.extract_image_prompt(answer)
  return answer if image_prompt is None else f"{answer}\n{IMAGE_PROMPT_LABEL} {image_prompt}"


def load_text_to_image(pipeline: str) -> Callable[[str, str], None]:
  """A function (prompt, png_path) drawing with a diffusers pipeline; diffusers stays optional."""
  if importlib.util.find_spec("diffusers") is None:
    raise ImportError("--t2i_pipeline needs the diffusers package, which mgjax does not install: "
                      "pip install diffusers (plus torch for its pipelines)")
  import diffusers

  pipe = diffusers.AutoPipelineForText2Image.from_pretrained(pipeline)

  def draw(prompt: str, path: str) -> None:
    pipe(prompt).images[0].save(path)

  return draw


class _Session:
  """What answering and showing answers need: the generator, its settings, an optional drawer."""

  def __init__(self, generator: decode.Generator, settings: dict[str, Any],
               draw: Callable[[str, str], None] | None = None, t2i_output: str = "t2i.png"):
    self.generator = generator
    self.settings = settings
    self.draw = draw
    self.t2i_output = t2i_output

  def answer(self, messages: list[dict[str, str]], images: list[bytes]) -> str:
    return self.generator.generate([messages], [images], **self.settings)[0]

  def show(self, answer: str, turn: int | None = None) -> None:
    """Prints the answer (and its image prompt); draws the prompt when a pipeline is loaded."""
    print(format_answer(answer), flush=True)
    image_prompt = decode.extract_image_prompt(answer)
    if self.draw is not None and image_prompt is not None:
      stem, suffix = os.path.splitext(self.t2i_output)
      path = self.t2i_output if turn is None else f"{stem}-{turn}{suffix or '.png'}"
      self.draw(image_prompt, path)
      print(f"image saved to {path}", file=sys.stderr, flush=True)


def _user_turn(text: str, with_image: bool) -> dict[str, str]:
  return {"role": "user", "content": f"<image>\n{text}" if with_image else text}


def chat(session: _Session, image: bytes | None) -> None:
  """One message per stdin line, keeping the history; /reset starts over, /quit or EOF ends.

  The image, if any, belongs to the first turn of each conversation.
  """
  interactive = sys.stdin.isatty()
  if interactive:
    print("Chat: one message per line; /reset starts over, /quit (or Ctrl-D) ends.", file=sys.stderr)
  images = [image] if image is not None else []
  history: list[dict[str, str]] = []
  turn = 0
  while True:
    if interactive:
      print("you> ", end="", flush=True)
    line = sys.stdin.readline()
    if not line or line.strip() == "/quit":
      break
    text = line.strip()
    if not text:
      continue
    if text == "/reset":
      history = []
      print("(conversation reset)", flush=True)
      continue
    history.append(_user_turn(text, with_image=bool(images) and not history))
    answer = session.answer(history, images)
    history.append({"role": "assistant", "content": answer})
    turn += 1
    session.show(answer, turn)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is empty: pass the folder a training run wrote")
  if _CHAT.value == (_PROMPT.value is not None):
    raise app.UsageError("pass either --prompt=TEXT or --chat")
  image = None
  if _IMAGE.value:
    if not epath.Path(_IMAGE.value).exists():
      sys.exit(f"error: --image={_IMAGE.value}: no such file")
    image = epath.Path(_IMAGE.value).read_bytes()
  runtime.setup()
  # Orbax warns that a read-only checkpoint manager will not save: noise around an answer.
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    # Before the model loads: a missing diffusers should not cost a minute first.
    draw = load_text_to_image(_T2I_PIPELINE.value) if _T2I_PIPELINE.value else None
    generator, _ = decode.load_workdir(_WORKDIR.value)
  except (checkpoint.CheckpointError, FileNotFoundError, ImportError) as e:
    sys.exit(f"error: {e}")
  settings = dict(max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                  top_p=_TOP_P.value, seed=_SEED.value)
  session = _Session(generator, settings, draw, _T2I_OUTPUT.value)
  if _CHAT.value:
    chat(session, image)
  else:
    answer = session.answer([_user_turn(_PROMPT.value, with_image=image is not None)],
                            [image] if image is not None else [])
    session.show(answer)


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
