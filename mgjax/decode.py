"""Text generation with a MiniGemini: KV-cache decoding, sampling, and a text-level Generator.

Two levels:
  `generate`   left-padded token batch -> new token ids. Greedy or sampled (temperature,
               top-k, top-p); with a KV cache (one program: a prefill, then a loop of steps)
               or, as the reference the cache is tested against, without one.
  `Generator`  conversations and image files -> answer strings: the chat template, <image>
               expansion and image preprocessing of training (ConversationEncoder.encode_prompt),
               batching, detokenising and stop strings.

`load_workdir` builds a Generator from a trained workdir (the CLI, mgjax.predict, and
evaluation use it). `extract_image_prompt` reads the text-to-image prompt of Mini-Gemini's
generation convention (a request ending in " <GEN>" is answered with "<h>prompt</h>").
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from mgjax import checkpoint
from mgjax import run_files
from mgjax import sharding
from mgjax.data import pipeline
from mgjax.data.records import PROMPT_CLOSE, PROMPT_OPEN
from mgjax.models import vlm

# ------------------------------------------------------------------------------ Token level


def _allowed(model, logits: jax.Array, num_tokens: int | None) -> jax.Array:
  """Logits [B, vocab] with the tokens decoding must never produce made impossible."""
  # Visual tokens come from images only; a generated <image> token would have no image.
  logits = logits.at[:, model.image_token_id].set(-jnp.inf)
  if num_tokens is not None:  # the model's vocabulary may be padded beyond the tokenizer's
    logits = jnp.where(jnp.arange(logits.shape[-1]) < num_tokens, logits, -jnp.inf)
  return logits


def _prefill_model(model, batch: Mapping[str, jax.Array], cache_size: int, num_tokens: int | None):
  embeds = model.embed_inputs(batch["input_ids"], batch["images_lowres"], batch["images_highres"])
  # DecoderLM.prefill: training's attention (no [B, P, cache_size] mask) and the logits of the
  # last column only, which left padding makes every row's last prompt token.
  logits, cache = model.llm.prefill(inputs_embeds=embeds, token_mask=batch["prompt_mask"], cache_size=cache_size)
  return _allowed(model, logits, num_tokens), cache


def _step_model(model, tokens: jax.Array, cache: dict[str, Any], num_tokens: int | None):
  logits, cache = model.llm.extend(tokens[:, None], cache=cache)
  return _allowed(model, logits[:, 0], num_tokens), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_size", "num_tokens"))
def _prefill(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array], cache_size: int,
             num_tokens: int | None = None):
  """The prompt into a fresh cache: next-token logits [B, vocab] and the cache."""
  return _prefill_model(nnx.merge(graphdef, params), batch, cache_size, num_tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens"), donate_argnames=("cache",))
def _decode_step(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array, cache: dict[str, Any],
                 num_tokens: int | None = None):
  """One new token per row [B] on top of the cache: next-token logits [B, vocab] and the cache."""
  return _step_model(nnx.merge(graphdef, params), tokens, cache, num_tokens)


def _layers_unstacked(model, cache: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  """`model` (merged inside a trace) and its cache with a scanned decoder's layers one by one.

  A scanned decoder (model.llm.scan_layers) keeps each weight as one [layers, ...] array and
  its cache as one [layers, B, S, K, D] array per k and v. On XLA:CPU every decode step then
  copies each layer's weights out of the stacked arrays (the dynamic slice is not fused into
  the matmul) and writes the whole cache anew: SmolLM2-135M at batch 8 spent 40 ms of a 98 ms
  step copying weights and 12 ms writing the cache. Unstacked once per `generate` call (one copy
  of the decoder's weights, a temporary of the program), the steps read the weights where they
  are and update a per-layer cache in place. `generate` does this on the CPU only: on an
  accelerator the copy would be a second set of weights on a device that holds the training
  state too. The model is changed in place.
  """
  llm = model.llm
  if not llm.scan_layers:
    return model, cache
  layer_def, stacked = nnx.split(llm.layers)
  llm.layers = nnx.List([
      nnx.merge(layer_def,
                nnx.spmd.remove_axis(jax.tree.map(lambda x, i=i: x[i], stacked), 0, {nnx.PARTITION_NAME: "layers"}))
      for i in range(llm.num_layers)
  ])
  llm.scan_layers = False
  kv = cache["layers"]
  return model, {**cache, "layers": [{"k": kv["k"][i], "v": kv["v"][i]} for i in range(llm.num_layers)]}


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "num_tokens", "unstack_layers"))
def _generate_cached(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
                     eos_id: jax.Array, pad_id: jax.Array, *, max_new_tokens: int, temperature: float, top_k: int,
                     top_p: float, num_tokens: int | None, unstack_layers: bool) -> jax.Array:
  """`generate` with the KV cache as one program: the prefill, then a while loop of decode steps.

  The same steps `_prefill` and `_decode_step` take, in one program: no host round trip and no
  dispatch per token (a step's dispatch alone, hashing the graphdef, took 7 ms on the CPU), and
  the cache stays in place. unstack_layers: unstack a scanned decoder for the decode steps (see
  `_layers_unstacked`); the prefill, run once, keeps the scan, which compiles one layer instead
  of all of them. Returns int32 [B, max_new_tokens] as `generate` does.
  """
  model = nnx.merge(graphdef, params)
  batch_size, prompt_len = batch["input_ids"].shape
  logits, cache = _prefill_model(model, batch, prompt_len + max_new_tokens, num_tokens)
  if unstack_layers:
    model, cache = _layers_unstacked(model, cache)
  graphdef, params = nnx.split(model)

  def sample(logits, i):
    return sample_tokens(logits, jax.random.fold_in(rng, i), temperature=temperature, top_k=top_k, top_p=top_p)

  first = sample(logits, 0)
  tokens = jnp.full((batch_size, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

  def more(state):
    i, _, _, _, finished = state
    return (i < max_new_tokens) & ~jnp.all(finished)

  def step(state):
    i, previous, cache, tokens, finished = state
    # Finished rows keep decoding (their output is no longer read) so the batch keeps its shape.
    logits, cache = _step_model(nnx.merge(graphdef, params), previous, cache, num_tokens)
    new = sample(logits, i)
    tokens = tokens.at[:, i].set(jnp.where(finished, pad_id, new))
    return i + 1, new, cache, tokens, finished | (new == eos_id)

  return jax.lax.while_loop(more, step, (jnp.int32(1), first, cache, tokens, first == eos_id))[3]


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens"))
def _full_forward(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array], input_ids: jax.Array,
                  token_mask: jax.Array, last: jax.Array, num_tokens: int | None = None) -> jax.Array:
  """No cache: the training forward over the whole sequence, logits [B, vocab] at column `last`.

  The sequence has a fixed length (prompt + every new token) so this compiles once; columns
  not generated yet are masked out like padding and, being later, cannot be seen anyway.
  """
  model = nnx.merge(graphdef, params)
  positions = jnp.maximum(jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1, 0)
  logits = model(input_ids, batch["images_lowres"], batch["images_highres"], positions=positions,
                 segment_ids=token_mask.astype(jnp.int32))
  return _allowed(model, jax.lax.dynamic_index_in_dim(logits, last, axis=1, keepdims=False), num_tokens)


def _descending(logits: jax.Array, top: jax.Array | None) -> jax.Array:
  """Each row of logits [B, vocab] sorted from the largest; `top`: its k largest, if top-k kept only those."""

  def sort():
    return jnp.sort(logits, axis=-1)[:, ::-1]

  if top is None:
    return sort()

  def from_top():
    return jnp.concatenate([top, jnp.full((top.shape[0], logits.shape[1] - top.shape[1]), -jnp.inf, logits.dtype)],
                           axis=1)

  # After top-k exactly k logits are left finite unless the k-th largest is tied (or some of
  # the k largest are -inf): the sorted row is then the k largest followed by -inf, exactly what
  # sorting the vocabulary (the cost of the sampler otherwise) gives.
  only_top = jnp.all(jnp.sum(logits > -jnp.inf, axis=-1) == top.shape[1])
  return jax.lax.cond(only_top, from_top, sort)


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def sample_tokens(logits: jax.Array, rng: jax.Array | None, *, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Next tokens [B] from logits [B, vocab]: argmax when temperature == 0, else a sample.

  Sampling draws from softmax(logits / temperature) restricted to the top_k most likely
  tokens (0: no limit) and to the smallest set whose probability reaches top_p (1.0: no limit).
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  top = None
  if top_k:
    top = jax.lax.top_k(logits, top_k)[0]
    # The k-th largest as the least of the k largest: XLA:CPU runs a slice of top_k's last
    # column as a sort of the whole vocabulary (60 ms for 8 rows of 49K tokens, against 0.6).
    kth_largest = jnp.min(top, axis=-1, keepdims=True)
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = _descending(logits, top)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the tokens more likely than it hold less than top_p: the most
    # likely token is always kept.
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole value of `x` as numpy, on every process.

  On several hosts the decoding batch is split over every host's devices, so no process
  can read a step's tokens alone: they are gathered from all processes (every process
  then holds the same tokens and takes the same decisions, e.g. when to stop).
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def generate(graphdef: nnx.GraphDef, params: Any, batch: Mapping[str, Any], *, max_new_tokens: int, eos_id: int,
             pad_id: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             rng: jax.Array | None = None, num_tokens: int | None = None, use_cache: bool = True) -> np.ndarray:
  """Continues each row of a left-padded prompt batch until eos or max_new_tokens.

  Runs on whatever devices params live on; under `jax.set_mesh(mesh)` and
  `nnx.logical_axis_rules(...)` the activations and the cache are split over the batch.
  On several hosts (params spanning every process's devices) every process passes the
  same whole batch, as one SPMD program; each gets all rows' tokens back.

  Args:
    graphdef: the MiniGemini's graph (nnx.split).
    params: its parameters (nnx.State or the pure dict of one).
    batch: input_ids [B, P] int (left-padded), prompt_mask [B, P] bool (False on padding),
      images_lowres [B, M, l, l, 3] (or [B, M, V, l, l, 3], MiniGemini.encode_images),
      images_highres [B, M, h, h, 3]; see `left_pad`.
    max_new_tokens: the most tokens generated per row.
    eos_id: a row is finished once it has emitted this token.
    pad_id: fills a row's output after its eos.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_k: sample only among the k most likely tokens (0: all).
    top_p: sample only among the most likely tokens holding this much probability (1: all).
    rng: the sampling key (default jax.random.key(0)); the same key gives the same tokens.
    num_tokens: ids from this one on are never generated (a vocabulary padded beyond the
      tokenizer's); the image token never is either.
    use_cache: False recomputes the whole sequence every step (slow; the reference).

  Returns:
    int32 [B, max_new_tokens]: each row's new tokens, its eos, then pad_id.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  rng = jax.random.key(0) if rng is None else rng
  batch = {k: batch[k] for k in ("input_ids", "prompt_mask", "images_lowres", "images_highres")}
  sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  if use_cache:
    return to_host(
        _generate_cached(graphdef, params, batch, rng, np.int32(eos_id), np.int32(pad_id),
                         max_new_tokens=max_new_tokens, num_tokens=num_tokens,
                         unstack_layers=jax.default_backend() == "cpu", **sampling))

  # The reference: every step recomputes the whole sequence, a step a Python iteration.
  batch_size, prompt_len = batch["input_ids"].shape
  input_ids = np.concatenate(
      [np.asarray(batch["input_ids"], np.int32),
       np.full((batch_size, max_new_tokens), pad_id, np.int32)], axis=1)
  token_mask = np.concatenate([np.asarray(batch["prompt_mask"], bool),
                               np.zeros((batch_size, max_new_tokens), bool)], axis=1)
  logits = _full_forward(graphdef, params, batch, input_ids, token_mask, prompt_len - 1, num_tokens=num_tokens)
  tokens = np.full((batch_size, max_new_tokens), pad_id, np.int32)
  finished = np.zeros(batch_size, bool)
  for i in range(max_new_tokens):
    new = to_host(sample_tokens(logits, jax.random.fold_in(rng, i), **sampling))
    tokens[:, i] = np.where(finished, pad_id, new)
    finished |= new == eos_id
    if finished.all() or i == max_new_tokens - 1:
      break
    input_ids[:, prompt_len + i] = new
    token_mask[:, prompt_len + i] = True
    logits = _full_forward(graphdef, params, batch, input_ids, token_mask, prompt_len + i, num_tokens=num_tokens)
  return tokens


def left_pad(prompts: Sequence[Mapping[str, np.ndarray]], *, pad_id: int, length: int | None = None,
             batch_size: int | None = None) -> dict[str, np.ndarray]:
  """Stacks encoded prompts (ConversationEncoder.encode_prompt) into a left-padded batch.

  Args:
    prompts: dicts of input_ids [P_i], images_lowres [M, l, l, 3] (or [M, V, l, l, 3]),
      images_highres [M, h, h, 3].
    pad_id: the token id in padding columns.
    length: the padded length (default the longest prompt); fixed lengths avoid recompiles.
    batch_size: rows in the batch (default len(prompts)); extra rows repeat the first prompt
      and are there only to keep the shape.

  Returns:
    input_ids [B, length] int32, prompt_mask [B, length] bool, images_lowres, images_highres.
  """
  if not prompts:
    raise ValueError("no prompts to batch")
  longest = max(len(p["input_ids"]) for p in prompts)
  length = longest if length is None else length
  batch_size = len(prompts) if batch_size is None else batch_size
  if length < longest or batch_size < len(prompts):
    raise ValueError(f"{len(prompts)} prompt(s) of up to {longest} tokens do not fit [{batch_size}, {length}]")
  rows = list(prompts) + [prompts[0]] * (batch_size - len(prompts))
  input_ids = np.full((batch_size, length), pad_id, np.int32)
  prompt_mask = np.zeros((batch_size, length), bool)
  for row, prompt in enumerate(rows):
    n = len(prompt["input_ids"])
    input_ids[row, length - n:] = prompt["input_ids"]
    prompt_mask[row, length - n:] = True
  return {
      "input_ids": input_ids,
      "prompt_mask": prompt_mask,
      "images_lowres": np.stack([p["images_lowres"] for p in rows]),
      "images_highres": np.stack([p["images_highres"] for p in rows]),
  }


# ------------------------------------------------------------------------------ Text level


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
  """`text` up to the earliest occurrence of any stop string (all of it if none occurs)."""
  cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
  return text[:min(cuts)] if cuts else text


def extract_image_prompt(answer: str) -> str | None:
  """The text-to-image prompt between the first <h> and the next </h>, stripped.

  None when the answer holds no such pair, the prompt is empty, or another <h> opens
  inside it.
  """
  start = answer.find(PROMPT_OPEN)
  if start < 0:
    return None
  start += len(PROMPT_OPEN)
  end = answer.find(PROMPT_CLOSE, start)
  if end < 0:
    return None
  prompt = answer[start:end]
  if PROMPT_OPEN in prompt or not prompt.strip():
    return None
  return prompt.strip()


def _batch_bucket(n: int, max_batch_size: int) -> int:
  """The smallest power of two >= n, at most max_batch_size: few distinct compiled shapes."""
  return min(1 << (n - 1).bit_length(), max_batch_size)


class Generator:
  """Answers conversations with a MiniGemini, as the model saw conversations in training."""

  def __init__(self, graphdef: nnx.GraphDef, params: Any, tokenizer, encoder, *, max_batch_size: int = 8,
               length_multiple: int = 64, mesh: jax.sharding.Mesh | None = None, rules: tuple = ()):
    """Args:
      graphdef, params: the model (nnx.split of a MiniGemini).
      tokenizer: the tokenizer it was trained with (chat template, eos, decoding).
      encoder: the training ConversationEncoder (pipeline.make_encoder) for templates and images.
      max_batch_size: prompts decoded together; more are decoded in several batches.
      length_multiple: prompts are left-padded to a multiple of this, so that prompts of
        similar length share one compiled program.
      mesh, rules: the mesh params are split over and its logical axis rules, entered while
        decoding (`placement`); None when the caller places things itself (the trainer
        decodes inside its own mesh) or params sit on one device.
    """
    self.mesh, self.rules = mesh, rules
    self.graphdef = graphdef
    self.params = params
    self.tokenizer = tokenizer
    self.encoder = encoder
    self.max_batch_size = max_batch_size
    self.length_multiple = length_multiple
    self.eos_id = tokenizer.eos_token_id
    if self.eos_id is None:
      raise ValueError(f"tokenizer {tokenizer.name_or_path} has no eos token: generation could never stop")

  @contextlib.contextmanager
  def placement(self):
    """The mesh and axis rules the params were split with, for anything computed with them."""
    if self.mesh is None:
      yield
      return
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      yield

  def generate(self, conversations: Sequence[Sequence[Mapping[str, str]]],
               images: Sequence[Sequence[bytes]] | None = None, *, max_new_tokens: int = 64, stop: Sequence[str] = (),
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """The assistant's next turn for each conversation.

    Args:
      conversations: each a list of {"role": "system" | "user" | "assistant", "content": str};
        an image's place in the text is marked with <image>.
      images: per conversation, its image files' bytes in <image> order (default none).
      max_new_tokens: the most tokens per answer.
      stop: each answer is cut at the first occurrence of any of these strings.
      temperature, top_k, top_p: sampling settings (temperature 0: greedy), see `generate`.
      seed: the sampling seed.

    Returns:
      One answer per conversation, special tokens removed.
    """
    if images is None:
      images = [[] for _ in conversations]
    if len(images) != len(conversations):
      raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
    prompts = [
        self.encoder.encode_prompt([dict(m)
                                    for m in conversation], list(files))
        for conversation, files in zip(conversations, images)
    ]
    rng = jax.random.key(seed)
    answers = []
    for start in range(0, len(prompts), self.max_batch_size):
      chunk = prompts[start:start + self.max_batch_size]
      longest = max(len(p["input_ids"]) for p in chunk)
      batch = left_pad(chunk, pad_id=self.encoder.pad_id,
                       length=-(-longest // self.length_multiple) * self.length_multiple,
                       batch_size=_batch_bucket(len(chunk), self.max_batch_size))
      with self.placement():
        tokens = generate(self.graphdef, self.params, batch, max_new_tokens=max_new_tokens, eos_id=self.eos_id,
                          pad_id=self.encoder.pad_id, temperature=temperature, top_k=top_k, top_p=top_p,
                          rng=jax.random.fold_in(rng, start), num_tokens=len(self.tokenizer))
      answers += [self._detokenize(row, stop) for row in tokens[:len(chunk)]]
    return answers

  def _detokenize(self, tokens: np.ndarray, stop: Sequence[str]) -> str:
    ids = tokens.tolist()
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return truncate_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), stop)


# ------------------------------------------------------------------------------ From a workdir


def _untrained_message(workdir: str) -> str:
  return (
      f"no trained checkpoint in {workdir}: train one first with "
      f"`python -m mgjax.main --config=configs/stage1.py --workdir={workdir}` (stage 1), then optionally "
      f"`python -m mgjax.main --config=configs/stage2.py --config.init_from={workdir} --workdir=WORKDIR2` (stage 2)")


def load_workdir(workdir: str, *, sharded: bool = False,
                 **generator_kwargs: Any) -> tuple[Generator, ml_collections.ConfigDict]:
  """A Generator for a workdir's result checkpoint, and the run's config.

  Args:
    workdir: a trained workdir, its checkpoints/ folder, or one checkpoints/<step> folder.
    sharded: False puts the params on this process's first device. True splits them over
      every device of the job (all processes of a multi-host one) as the trainer splits them
      (the run's mesh axes and rules); the Generator then decodes under that mesh
      (Generator.placement), every process passing the same prompts.
    **generator_kwargs: passed to Generator (max_batch_size, length_multiple).

  Returns:
    (Generator, the run's config).

  Raises:
    checkpoint.CheckpointError: nothing trained there (the message says what to run).
    FileNotFoundError: the workdir has no saved tokenizer.
  """
  try:
    run_dir, step = checkpoint.locate(workdir)
  except checkpoint.ResultMissing:
    raise  # trained, but its result is gone: the message says which and what to pass
  except checkpoint.CheckpointError as e:
    raise checkpoint.CheckpointError(_untrained_message(workdir)) from e
  ckpts = checkpoint.Checkpoints(run_dir, read_only=True)
  config = ml_collections.ConfigDict(ckpts.meta(step)["config"])
  tokenizer = run_files.load_tokenizer(epath.Path(run_dir) / "tokenizer")
  model_cfg = run_files.resolve_model_config(config.model, tokenizer)

  with nnx.use_eager_sharding(False):
    abstract_model = nnx.eval_shape(lambda: vlm.MiniGemini(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract_model)
  mesh, rules = None, ()
  if sharded:
    mesh_cfg = ml_collections.ConfigDict(config.mesh.to_dict())
    mesh_cfg.num_devices = 0  # every device of the job, whatever the run trained on
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.logical_rules(mesh_cfg)
    shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_state, mesh, rules))
  else:
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one_device, nnx.to_pure_dict(abstract_state))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(abstract_state), shardings)
  params, _ = ckpts.restore_params(step, target)
  ckpts.close()

  encoder = pipeline.make_encoder(tokenizer, config.data, model_cfg, vlm.num_image_tokens(model_cfg))
  return Generator(graphdef, params, tokenizer, encoder, mesh=mesh, rules=rules, **generator_kwargs), config
