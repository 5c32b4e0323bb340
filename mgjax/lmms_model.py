"""An mgjax workdir as an lmms-eval model: any lmms-eval task on an mgjax checkpoint.

  pip install -e '.[eval]' && pip uninstall -y torchvision
  python -m lmms_eval --model mgjax --model_args workdir=runs/stage2[,batch_size=8,max_new_tokens=128] \\
      --tasks mme,textvqa_val --output_path results/

mgjax registers itself with lmms-eval through the `lmms_eval.models` entry point
(mgjax.lmms_plugin), so lmms-eval is used as released, not forked. Two classes serve the
two kinds of lmms-eval request:

  MgjaxChat    (the default) generation from the task's messages: the whole conversation,
               images where they are, turns before the asked one included.
  MgjaxSimple  (`--force_simple`) generation from the task's text and images, and
               `loglikelihood` (multiple-choice tasks), which lmms-eval asks only of simple
               models.

Both answer through the code mgjax's own evaluation decodes with (decode.load_workdir,
decode.Generator): the run's chat template, <image> expansion and image preprocessing (HD
views included), batched KV-cache decoding. Requests are decoded in the order lmms-eval
gives them (a task's documents in order), `batch_size` at a time, so a task over an mgjax
validation split gets the very answers mgjax's own evaluation decodes at that batch size.

Images go where the messages put them. A user turn's image items become <image>
placeholders in its text, each followed by a newline unless the text after it starts with
one: a task's single image before its question reads "<image>\\n" + question, the layout
Mini-Gemini trains and evaluates with.

On several hosts, run the same command on every host (as for training) with WORLD_SIZE
unset: each process then sees every request, and the params and the decoding batch are
split over every device of the job, one SPMD program (`sharded`, on by default there).
Every process computes the same scores; keep process 0's output.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from PIL import Image
from tqdm import tqdm

from mgjax import decode, likelihood, runtime
from mgjax.data.records import IMAGE_PLACEHOLDER

_TRUE = ("1", "true", "yes")


def sampling_settings(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> dict[str, Any]:
  """lmms-eval's generation kwargs (Hugging Face `generate` names) as decode.Generator's."""
  gen_kwargs = dict(gen_kwargs or {})
  num_beams = int(gen_kwargs.get("num_beams") or 1)
  if num_beams > 1:
    raise ValueError(f"num_beams={num_beams}: mgjax decodes greedily or by sampling, not by beam search; "
                     "run the task with num_beams=1 (--gen_kwargs num_beams=1)")
  until = gen_kwargs.get("until") or []
  temperature = float(gen_kwargs.get("temperature") or 0.0)
  do_sample = gen_kwargs.get("do_sample")
  # As transformers: do_sample=False decodes greedily whatever the temperature; lmms-eval's
  # own models sample when a temperature above 0 is given without do_sample.
  sample = temperature > 0 if do_sample is None else str(do_sample).lower() in _TRUE
  return {
      "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
      "stop": [until] if isinstance(until, str) else list(until),
      "temperature": (temperature or 1.0) if sample else 0.0,
      "top_k": int(gen_kwargs.get("top_k") or 0) if sample else 0,
      "top_p": float(gen_kwargs.get("top_p") or 1.0) if sample else 1.0,
  }


def image_file(visual: Any) -> bytes | Image.Image:
  """What mgjax's preprocessing reads (mgjax.data.images.decode) from an lmms-eval visual:
  a PIL image, an image file's path, or its bytes."""
  if isinstance(visual, (Image.Image, bytes)):
    return visual
  if isinstance(visual, str) and os.path.exists(visual):
    with open(visual, "rb") as f:
      return f.read()
  if isinstance(visual, dict) and isinstance(visual.get("bytes"), bytes):  # a datasets Image column undecoded
    return visual["bytes"]
  raise ValueError(f"mgjax takes images only (a PIL image, a file's path or bytes), not {type(visual).__name__} "
                   f"{str(visual)[:80]!r}: video and audio tasks cannot run on it")


def with_placeholders(items: Sequence[tuple[str, Any]]) -> tuple[str, list[Any]]:
  """A message's (kind, value) items, kind "text" or "image", as mgjax text with <image>
  placeholders and the images in order."""
  text, files = "", []
  for i, (kind, value) in enumerate(items):
    if kind == "image":
      files.append(image_file(value))
      text += IMAGE_PLACEHOLDER
      following = items[i + 1] if i + 1 < len(items) else None
      if following is None or following[0] != "text" or not following[1].startswith("\n"):
        text += "\n"
    else:
      text += value
  return text, files


def chat_conversation(messages: ChatMessages) -> tuple[list[dict[str, str]], list[Any]]:
  """lmms-eval's messages as an mgjax conversation and its images in <image> order."""
  conversation, files = [], []
  for message in messages.messages:
    items = []
    for content in message.content:
      if content.type == "text":
        items.append(("text", content.text))
      elif content.type == "image":
        items.append(("image", content.url))
      else:
        raise ValueError(f"mgjax takes text and images only, not {content.type}: this task cannot run on it")
    text, message_files = with_placeholders(items)
    conversation.append({"role": message.role, "content": text})
    files += message_files
  return conversation, files


def simple_conversation(context: str, visuals: Sequence[Any] | None) -> tuple[list[dict[str, str]], list[Any]]:
  """A simple task's context and images as one user turn: the context's own <image>
  placeholders if it has them, else one per image before it (as lmms-eval's LLaVA model)."""
  visuals = [v for v in (visuals or []) if v is not None]
  if IMAGE_PLACEHOLDER in context:
    return [{"role": "user", "content": context}], [image_file(v) for v in visuals]
  text, files = with_placeholders([("image", v) for v in visuals] + [("text", context)])
  return [{"role": "user", "content": text}], files


class _MgjaxModel(lmms):
  """What both classes share: the workdir's model, and decoding in lmms-eval's order."""

  def __init__(self, workdir: str | None = None, batch_size: int | str = 8, max_new_tokens: int | str = 128,
               sharded: bool | str | None = None, seed: int | str = 0, distributed: bool | str = False,
               coordinator_address: str | None = None, num_processes: int | str | None = None,
               process_id: int | str | None = None, max_batch_size: Any = None, device: Any = None, **unknown: Any):
    """Args (from --model_args, as strings):
      workdir: a trained mgjax workdir, its checkpoints/ folder or one checkpoints/<step>.
      batch_size: requests decoded together (--batch_size works too; model_args wins).
      max_new_tokens: the most tokens per answer when the task sets none.
      sharded: split the params and batch over every device of the job (default: when the
        job has several processes); else one device.
      seed: the sampling seed (tasks that sample).
      distributed: call jax.distributed.initialize first, for a job over several hosts
        (coordinator_address, num_processes and process_id where JAX does not find them
        itself, as for `python -m mgjax.main --distributed`).
      max_batch_size, device: lmms-eval passes these to every model; mgjax places the model
        by `sharded` and batches by batch_size.
    """
    super().__init__()
    if unknown:
      raise ValueError(f"unknown mgjax model_args {sorted(unknown)}: known are workdir, batch_size, "
                       "max_new_tokens, sharded, seed, distributed, coordinator_address, num_processes, process_id")
    if not workdir:
      raise ValueError("--model_args workdir=PATH is required: a trained mgjax workdir or checkpoint")
    runtime.cpu_only_without_accelerator()
    runtime.prepare_backend()
    if str(distributed).lower() in _TRUE:
      jax.distributed.initialize(coordinator_address=coordinator_address,
                                 num_processes=None if num_processes is None else int(num_processes),
                                 process_id=None if process_id is None else int(process_id))
    self.batch_size_per_gpu = int(batch_size)
    self.max_new_tokens = int(max_new_tokens)
    self.seed = int(seed)
    sharded = jax.process_count() > 1 if sharded is None else str(sharded).lower() in _TRUE
    self.generator, _ = decode.load_workdir(workdir, sharded=sharded, max_batch_size=self.batch_size_per_gpu)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    # lmms-eval passes --batch_size (default 1) beside model_args; a batch_size in model_args
    # would arrive twice, so model_args wins.
    args = lmms_utils.simple_parse_args_string(arg_string)
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
    return cls(**args, **extra)

  @property
  def batch_size(self) -> int:
    return self.batch_size_per_gpu

  def _answer(self, requests: Sequence[Instance], conversation_of: Callable[[Instance], tuple[list, list]],
              gen_kwargs_of: Callable[[Instance], dict]) -> list[str]:
    """Answers in request order; requests with the same generation settings are decoded
    together, batch_size at a time."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
      groups.setdefault(json.dumps(gen_kwargs_of(request), sort_keys=True, default=str), []).append(i)
    answers: list[str | None] = [None] * len(requests)
    progress = tqdm(total=len(requests), desc="mgjax answering", disable=self.rank != 0)
    for indices in groups.values():
      settings = sampling_settings(gen_kwargs_of(requests[indices[0]]), self.max_new_tokens)
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        conversations, files = zip(*(conversation_of(requests[i]) for i in chunk))
        got = self.generator.generate(list(conversations), list(files), seed=self.seed + start, **settings)
        for i, answer in zip(chunk, got):
          answers[i] = answer
          self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs_of(requests[i])), answer)
        progress.update(len(chunk))
    progress.close()
    return answers

  def _doc(self, task: str, split: str, doc_id: int) -> dict:
    return self.task_dict[task][split][doc_id]

  def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
    raise NotImplementedError("mgjax answers one turn per request; multi-round tasks are not supported")


class MgjaxChat(_MgjaxModel):
  """Generation from the task's messages (lmms-eval's chat interface)."""

  is_simple = False

  def generate_until(self, requests: list[Instance]) -> list[str]:

    def conversation_of(request):
      _, doc_to_messages, _, doc_id, task, split = request.args
      return chat_conversation(ChatMessages(messages=doc_to_messages(self._doc(task, split, doc_id))))

    return self._answer(requests, conversation_of, lambda r: r.args[2])

  def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
    raise NotImplementedError("lmms-eval asks chat models for generation only; run multiple-choice tasks with "
                              "--force_simple (mgjax's simple model scores answers)")


class MgjaxSimple(_MgjaxModel):
  """Generation from the task's text and images, and answer scoring (lmms-eval's simple
  interface; `--force_simple`)."""

  is_simple = True

  def _conversation(self, request: Instance) -> tuple[list, list]:
    context, _, doc_to_visual, doc_id, task, split = request.args
    return simple_conversation(context, doc_to_visual(self._doc(task, split, doc_id)))

  def generate_until(self, requests: list[Instance]) -> list[str]:
    return self._answer(requests, self._conversation, lambda r: r.args[1])

  def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
    """(loss, greedy) per request: the mean cross-entropy of the continuation as the
    assistant's answer (mgjax.likelihood; lower is better, as lmms-eval's multiple choice
    takes the argmin) and whether greedy decoding gives it."""
    conversations, files, answers = [], [], []
    for request in requests:
      context, continuation, doc_to_visual, doc_id, task, split = request.args
      doc = self._doc(task, split, doc_id)
      conversation, images = simple_conversation(context, doc_to_visual(doc))
      conversations.append(conversation)
      files.append(images)
      # A loglikelihood task hands its doc_to_target function instead of the text.
      answers.append(continuation(doc) if callable(continuation) else continuation)
    generator = self.generator
    with generator.placement():
      scores = likelihood.score_answers(generator.graphdef, generator.params, generator.encoder, conversations, files,
                                        [str(a) for a in answers], num_tokens=len(generator.tokenizer),
                                        batch_size=self.batch_size)
    # lmms-eval 0.7.3 turns every response that is not a string or a GenerationResult into
    # its str() (api/instance.py unwrap_generation_output), which would break multiple
    # choice's (loss, greedy) pairs; inside a GenerationResult they pass through.
    return [GenerationResult(text=(s.loss, s.greedy)) for s in scores]
