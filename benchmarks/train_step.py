"""Train-step benchmark: mgjax's Llama DecoderLM vs the CPU's matmul peak and vs PyTorch.

One run measures, interleaved round by round so that a change in the machine's load hits every
side alike:
  * the float32 matmul peak in JAX and in torch (square matmuls, before and after every round),
  * a full jitted, donated JAX training step (forward, backward, AdamW) of mgjax's DecoderLM,
    one entry per --variants name (an attention formulation, optionally +rope_concat),
  * Hugging Face transformers' LlamaForCausalLM PyTorch step (AdamW) of the same config.
Each round runs --steps_per_round consecutive steps of each side and times the last. Defaults:
110M parameters (hidden 768, 12 layers, vocab 32000), float32, batch 1 x seq 1024, 5 rounds.

  python benchmarks/train_step.py                       # the trainer vs torch, 5 rounds
  python benchmarks/train_step.py --variants=einsum5d,bhtd,trainer --rounds=3 --json=/tmp/r.json
  python benchmarks/train_step.py --variants=trainer --no_torch --xla_flags=--xla_cpu_use_onednn=true
  python benchmarks/train_step.py --micro=15 --variants=einsum5d,bhtd_causal8,trainer  # attention alone
  python benchmarks/train_step.py --profile=/tmp/trace   # perfetto trace + compiled HLO of one step

Prints a header (CPU, cores, XLA_FLAGS, GLIBC_TUNABLES, parameter counts, model GFLOP per step,
each variant's compile time and hardware GFLOP), one line per round, then the JAX and torch matmul
peaks (median, min, max) and one row per side: median step seconds, tokens/s, model GFLOP/s and
MFU (the model FLOPs of mgjax.flops, MaxText's count, one for both sides, against the JAX matmul
peak), HFU (each JAX variant's hardware FLOPs, XLA's count of its compiled step, against the same
peak; torch has none), speed relative to torch, loss, and the process's page faults and kernel
CPU seconds during the timed step. --json also writes every round's values. --micro instead times one layer's
attention forward + backward per variant, as median ms and the ratio to the first variant.
Targets (>= 0.8 of the matmul peak, >= 1.0x torch) and results: benchmarks/RESULTS.md.

Both sides run with the process settings of `python -m mgjax.main` (mgjax/runtime.py): its XLA:CPU
flags and its glibc malloc tunable. XLA flags and malloc tunables are read once when the process
starts, so variants of them are separate invocations (--xla_flags, --malloc=glibc_default);
everything else runs side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--hidden", type=int, default=768)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--kv_heads", type=int, default=12)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--mlp", type=int, default=2048)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds (medians over them)")
  p.add_argument("--variants", default="trainer",
                 help="comma list of JAX variants, see VARIANTS (attention/loss formulations)")
  p.add_argument(
      "--xla_flags", default="",
      help="appended to XLA_FLAGS before JAX starts; a flag named here overrides the trainer's "
      "(mgjax/runtime.py), e.g. --xla_flags=--xla_cpu_experimental_ynn_fusion_type= turns YNNPACK off")
  p.add_argument(
      "--malloc", choices=["trainer", "glibc_default"], default="trainer",
      help="trainer: restart with the glibc malloc tunable `python -m mgjax.main` sets "
      "(mgjax/runtime.py: malloc_tunables); glibc_default: the environment as it is")
  p.add_argument(
      "--steps_per_round", type=int, default=2,
      help="consecutive steps of each side per round, the last one timed: a training run "
      "repeats one step, and the first step after the other side pays for memory that "
      "side just gave back")
  p.add_argument("--matmul_size", type=int, default=2048)
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch side")
  p.add_argument("--profile", default="", help="write a perfetto trace of one step per variant here")
  p.add_argument("--json", default="", help="also write the results here")
  p.add_argument(
      "--micro", type=int, default=0, help="instead of steps: time one layer's attention forward+backward per variant, "
      "this many interleaved repetitions (short calls resolve small differences on a "
      "loaded machine better than 10 s steps)")
  return p.parse_args()


ARGS = parse_args()
from mgjax import runtime  # noqa: E402  (light: absl flags only, no JAX)

if ARGS.malloc == "trainer":
  # The process settings `python -m mgjax.main` runs with; both sides share them.
  runtime.restart_with_malloc_tunables()
if ARGS.xla_flags:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_flags).strip()
runtime.set_xla_flags()  # the trainer's XLA:CPU flags, where --xla_flags did not set them
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402  (after XLA_FLAGS is set)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from mgjax import flops, train_step  # noqa: E402
from mgjax.models import attention, llm  # noqa: E402

LR = 1e-4
WEIGHT_DECAY = 0.01

# ------------------------------------------------------------------ FLOPs


def param_counts(a: argparse.Namespace) -> dict[str, int]:
  attn = a.hidden * a.head_dim * (a.heads + 2 * a.kv_heads) + a.heads * a.head_dim * a.hidden
  mlp = 3 * a.hidden * a.mlp
  blocks = a.layers * (attn + mlp + 2 * a.hidden)
  return {"blocks": blocks, "lm_head": a.hidden * a.vocab, "embed": a.vocab * a.hidden, "final_norm": a.hidden}


def model_flops(a: argparse.Namespace) -> float:
  """The model FLOPs of one step (mgjax.flops: 6 x matmul weights x tokens plus the causal
  attention, MaxText's count), everything trained: one count for every side."""
  llm_cfg = dict(layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, mlp=a.mlp)
  model = nnx.eval_shape(lambda: TextOnly(llm.DecoderLM(vocab_size=a.vocab, **llm_cfg, rngs=nnx.Rngs(0))))
  params = nnx.split(model, nnx.Param)[1].to_pure_dict()
  return flops.model_flops(params, {"llm": llm_cfg, "vocab_size": a.vocab}, a.seq)(a.batch * a.seq)


# ------------------------------------------------------------------ matmul peak


def jax_matmul_peak(n: int, reps: int = 5) -> float:
  """Median GFLOP/s of an n x n float32 matmul in JAX."""
  f = jax.jit(lambda x, y: x @ y)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  f(x, x).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(x, x).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(times) / 1e9


def torch_matmul_peak(n: int, reps: int = 5) -> float:
  import torch
  x = torch.randn(n, n)
  torch.mm(x, x)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    torch.mm(x, x)
    times.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(times) / 1e9


# ------------------------------------------------------------------ JAX variants


def attention_einsum_5d(q, k, v, mask=None):
  """The baseline formulation: grouped 5-D einsums, scores laid out [B, K, G, T, S]."""
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (d**-0.5)
  if mask is not None:
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def attention_jax_nn(q, k, v, mask=None):
  """jax.nn.dot_product_attention's XLA path with the same boolean mask."""
  return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None], implementation="xla")


def attention_bhtd(q, k, v, mask=None):
  """Heads moved next to the batch first ([B, H, T, D]): both score matmuls then have their
  batch dims leading and contract the minor dim, the layout XLA:CPU's dot runs without copies."""
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  g = h // kv_heads
  qh = jnp.transpose(q.reshape(b, t, kv_heads, g, d), (0, 2, 3, 1, 4)).reshape(b, kv_heads, g * t, d)
  kh = jnp.transpose(k, (0, 2, 1, 3))  # [B, K, S, D]
  vh = jnp.transpose(v, (0, 2, 1, 3))
  scores = jnp.einsum("bkqd,bksd->bkqs", qh * jnp.asarray(d**-0.5, q.dtype), kh, preferred_element_type=jnp.float32)
  if mask is not None:
    m = jnp.broadcast_to(mask[:, None, None], (b, kv_heads, g, t, mask.shape[-1]))
    scores = jnp.where(m.reshape(b, kv_heads, g * t, -1), scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, vh).reshape(b, kv_heads, g, t, d)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d)


def causal_blocks(base, blocks: int):
  """`base` run per block of queries against only the keys up to the block's end.

  Valid for masks that are causal (a query never sees a later key), as the trainer's packed
  masks are: the skipped keys are masked anyway. It computes (blocks + 1) / (2 blocks) of the
  T x T scores and softmax instead of all of them.
  """

  def blocked(q, k, v, mask=None):
    t = q.shape[1]
    if t != k.shape[1] or t % blocks:
      return base(q, k, v, mask)
    c = t // blocks
    outs = []
    for i in range(blocks):
      end = (i + 1) * c
      m = None if mask is None else mask[:, i * c:end, :end]
      outs.append(base(q[:, i * c:end], k[:, :end], v[:, :end], m))
    return jnp.concatenate(outs, axis=1)

  return blocked


ATTENTION = {
    "trainer": None,  # mgjax.models.attention.causal_attention, as the trainer calls it (XLA on CPU)
    "einsum5d": attention_einsum_5d,
    "jax_nn": attention_jax_nn,
    "bhtd": attention_bhtd,
    "einsum5d_causal4": causal_blocks(attention_einsum_5d, 4),
    "einsum5d_causal8": causal_blocks(attention_einsum_5d, 8),
    "bhtd_causal4": causal_blocks(attention_bhtd, 4),
    "bhtd_causal8": causal_blocks(attention_bhtd, 8),
    "bhtd_causal16": causal_blocks(attention_bhtd, 16),
    "einsum5d_causal16": causal_blocks(attention_einsum_5d, 16),
    "jax_nn_causal4": causal_blocks(attention_jax_nn, 4),
}


def apply_rope_concat(x, positions, theta=10000.0, *, inv_freq=None):
  """RoPE as a baseline to the trainer's flip formulation: the halves sliced and concatenated
  back, which XLA:CPU runs as pad/concatenate fusions forward and backward."""
  half = x.shape[-1] // 2
  if inv_freq is None:
    inv_freq = llm.rope_frequencies(x.shape[-1], theta)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# Parts of the model a variant can swap in after a '+', e.g. 'trainer+rope_concat'.
ROPE = {"rope_concat": apply_rope_concat}
# A variant is attention[+rope]: an attention formulation, optionally a baseline RoPE.
VARIANTS_HELP = f'attention one of {sorted(ATTENTION)}, optionally followed by +{"|+".join(sorted(ROPE))}'


class TextOnly(nnx.Module):
  """MiniGemini's call signature around the bare DecoderLM, so step.make_loss_fn runs as is."""

  def __init__(self, decoder: llm.DecoderLM):
    self.llm = decoder

  def hidden_states(self, input_ids, images_lowres, images_highres, *, positions=None, segment_ids=None):
    del images_lowres, images_highres  # text only: no image tokens
    return self.llm.hidden_states(input_ids, positions=positions, segment_ids=segment_ids)

  def embed_inputs(self, input_ids, images_lowres, images_highres):
    """What the loss of a decoder with experts feeds its hidden_states (text only: the embeddings)."""
    del images_lowres, images_highres
    return self.llm.embed(input_ids)


def make_batch(a: argparse.Namespace) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  ids = rng.integers(0, a.vocab, (a.batch, a.seq + 1), dtype=np.int32)
  return {
      "input_ids": ids[:, :-1],
      "targets": ids[:, 1:],
      "loss_mask": np.ones((a.batch, a.seq), np.float32),
      "positions": np.broadcast_to(np.arange(a.seq, dtype=np.int32), (a.batch, a.seq)).copy(),
      "segment_ids": np.ones((a.batch, a.seq), np.int32),
      "images_lowres": np.zeros((a.batch, 0, 1, 1, 3), np.float32),
      "images_highres": np.zeros((a.batch, 0, 1, 1, 3), np.float32),
  }


class JaxStep:
  """One variant's compiled step plus the state it updates in place (donated)."""

  def __init__(self, a: argparse.Namespace, variant: str, batch: dict[str, np.ndarray]):
    self.name = variant
    name, *swaps = variant.split("+")
    formulation = ATTENTION[name]
    original, original_rope = attention.causal_attention, llm.apply_rope
    if formulation is not None:
      # The variants take the whole mask and decide about block skipping themselves.
      attention.causal_attention = lambda q, k, v, segment_ids, implementation="auto": formulation(
          q, k, v, attention.segment_mask(segment_ids, segment_ids))
    for swap in swaps:
      llm.apply_rope = ROPE[swap]
    try:
      model = TextOnly(
          llm.DecoderLM(vocab_size=a.vocab, hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads,
                        head_dim=a.head_dim, mlp=a.mlp, dtype=jnp.float32, rngs=nnx.Rngs(0)))
      graphdef, params = nnx.split(model, nnx.Param)
      loss_fn = train_step.make_loss_fn(graphdef)
      tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)

      def step(params, opt_state, batch):
        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss / count

      self.batch = jax.tree.map(jnp.asarray, batch)
      self.params = params
      self.opt_state = tx.init(params)
      jitted = jax.jit(step, donate_argnums=(0, 1))
      t = time.perf_counter()
      lowered = jitted.lower(self.params, self.opt_state, self.batch)
      self.compiled = lowered.compile()
      self.compile_s = time.perf_counter() - t
      # The step has no loop: XLA's count of it as compiled is the hardware FLOPs.
      self.hardware_flops = flops.compiled_costs(self.compiled)["flops"] or float("nan")
      self.hlo_text = self.compiled.as_text()
    finally:
      attention.causal_attention, llm.apply_rope = original, original_rope
    self.loss = None

  def run(self) -> float:
    t = time.perf_counter()
    self.params, self.opt_state, loss = self.compiled(self.params, self.opt_state, self.batch)
    self.loss = float(loss)  # blocks until the step is done
    return time.perf_counter() - t


def steady(run, n: int) -> tuple[float, int, float]:
  """The last of n consecutive steps, as a run of them sees it: seconds, page faults, kernel seconds.

  The faults and the kernel (system) CPU time are the whole process's during that step: on CPU,
  memory a step maps afresh costs one fault per page, paid inside whichever op first writes it.
  """
  for _ in range(n - 1):
    run()
  before = resource.getrusage(resource.RUSAGE_SELF)
  seconds = run()
  after = resource.getrusage(resource.RUSAGE_SELF)
  return seconds, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime


# ------------------------------------------------------------------ torch side


class TorchStep:

  def __init__(self, a: argparse.Namespace, batch: dict[str, np.ndarray]):
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.mlp,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   num_key_value_heads=a.kv_heads, head_dim=a.head_dim, max_position_embeddings=a.seq,
                                   tie_word_embeddings=False, torch_dtype=torch.float32)
    self.model = transformers.LlamaForCausalLM(cfg).float().train()
    self.attn_impl = self.model.config._attn_implementation
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    # HF shifts labels itself: labels = input ids.
    ids = np.concatenate([batch["input_ids"], batch["targets"][:, -1:]], axis=1)
    self.ids = torch.from_numpy(ids[:, :-1].astype(np.int64))
    self.labels = torch.from_numpy(ids[:, :-1].astype(np.int64))
    self.loss = None

  def run(self) -> float:
    t = time.perf_counter()
    loss = self.model(input_ids=self.ids, labels=self.labels).loss
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.loss = loss.item()
    return time.perf_counter() - t


# ------------------------------------------------------------------ attention micro-benchmark


def micro(a: argparse.Namespace, variants: list[str]) -> None:
  """Forward + backward of one layer's attention (scores, mask, softmax, values) per variant."""
  rng = np.random.default_rng(0)
  shape_q = (a.batch, a.seq, a.heads, a.head_dim)
  shape_kv = (a.batch, a.seq, a.kv_heads, a.head_dim)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (shape_q, shape_kv, shape_kv))
  segments = jnp.ones((a.batch, a.seq), jnp.int32)
  mask = attention.segment_mask(segments, segments)
  fns = {}
  for name in variants:
    # The trainer's function as Attention.__call__ calls it (segment ids, no mask).
    f = ATTENTION[name.split("+")[0]] or (lambda q, k, v, mask: attention.xla_attention(q, k, v, segments))
    loss = lambda q, k, v, f=f: jnp.sum(f(q, k, v, mask)**2)
    fns[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(fns[name](q, k, v))
  times = {n: [] for n in fns}
  for _ in range(a.micro):
    for n, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(q, k, v))
      times[n].append(time.perf_counter() - t)
  base = statistics.median(times[variants[0]])
  print(f"attention fwd+bwd, one layer, [{a.batch}, {a.seq}, {a.heads}x{a.head_dim}], "
        f"{a.micro} interleaved calls; median ms (ratio to {variants[0]})")
  for n, t in times.items():
    print(f"  {n:<22}{statistics.median(t) * 1e3:8.1f} ms  {statistics.median(t) / base:5.2f}")


# ------------------------------------------------------------------ main


def main() -> None:
  a = ARGS
  variants = [v for v in a.variants.split(",") if v]
  for v in variants:
    if v.split("+")[0] not in ATTENTION or any(p not in ROPE for p in v.split("+")[1:]):
      sys.exit(f"unknown variant {v!r}: {VARIANTS_HELP}")
  if a.micro:
    micro(a, variants)
    return
  step_flops = model_flops(a)
  tokens = a.batch * a.seq
  counts = param_counts(a)
  cpu = next((l.split(":", 1)[1].strip()
              for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
              if l.startswith("Model name")), "?")
  print(f'# {time.strftime("%Y-%m-%d %H:%M")}  cpu {cpu} x{os.cpu_count()}  jax {jax.__version__}  '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}  GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")!r}')
  print(f'# non-embedding params {(counts["blocks"] + counts["lm_head"]) / 1e6:.1f}M '
        f'(blocks {counts["blocks"] / 1e6:.1f}M + lm_head {counts["lm_head"] / 1e6:.1f}M), '
        f'batch {a.batch} x seq {a.seq}; model {step_flops / 1e9:.1f} GFLOP/step')
  batch = make_batch(a)

  steps = {}
  for v in variants:
    steps[v] = JaxStep(a, v, batch)
    print(
        f"# jax {v}: compiled in {steps[v].compile_s:.1f}s, hardware {steps[v].hardware_flops / 1e9:.1f} "
        "GFLOP/step", flush=True)
  torch_step = None
  if not a.no_torch:
    import torch
    torch_step = TorchStep(a, batch)
    print(f"# torch {torch.__version__} threads {torch.get_num_threads()}, attention "
          f"{torch_step.attn_impl}", flush=True)

  # Warm-up: first calls allocate and (torch) pick kernels.
  for s in steps.values():
    s.run()
  if torch_step:
    torch_step.run()

  if a.profile:
    for v, s in steps.items():
      out = os.path.join(a.profile, v.replace("+", "_"))
      with jax.profiler.trace(out, create_perfetto_trace=True):
        s.run()
      with open(os.path.join(out, "hlo.txt"), "w") as f:
        f.write(s.hlo_text)
      print(f"# profile of {v} in {out}")

  times = {v: [] for v in steps}
  times["torch"] = []
  faults = {k: [] for k in times}
  kernel_s = {k: [] for k in times}
  peaks = {"jax": [], "torch": []}

  def record(side: str, measured: tuple[float, int, float]) -> None:
    for table, value in zip((times, faults, kernel_s), measured):
      table[side].append(value)

  for r in range(a.rounds):
    peaks["jax"].append(jax_matmul_peak(a.matmul_size))
    if torch_step:
      peaks["torch"].append(torch_matmul_peak(a.matmul_size))
      record("torch", steady(torch_step.run, a.steps_per_round))
    for v, s in steps.items():
      record(v, steady(s.run, a.steps_per_round))
    print(
        f'# round {r}: peak jax {peaks["jax"][-1]:.0f} GFLOP/s, ' +
        ", ".join(f"{k} {t[-1]:.2f}s" for k, t in times.items() if t), flush=True)
  peaks["jax"].append(jax_matmul_peak(a.matmul_size))
  if torch_step:
    peaks["torch"].append(torch_matmul_peak(a.matmul_size))

  peak = statistics.median(peaks["jax"])
  torch_t = statistics.median(times["torch"]) if times["torch"] else float("nan")
  print(f'\nmatmul peak {a.matmul_size}^3 f32: jax median {peak:.0f} GFLOP/s '
        f'(min {min(peaks["jax"]):.0f}, max {max(peaks["jax"]):.0f})' +
        (f', torch median {statistics.median(peaks["torch"]):.0f} GFLOP/s' if peaks["torch"] else ""))
  rows = []
  print(f'{"side":<22}{"step s":>8}{"tok/s":>9}{"GFLOP/s":>9}{"MFU":>7}{"HFU":>7}{"/torch":>8}{"loss":>8}'
        f'{"faults":>9}{"sys s":>7}')
  for k, t in times.items():
    if not t:
      continue
    med = statistics.median(t)
    row = {
        "side": k if k == "torch" else f"jax {k}",
        "step_s": med,
        "spread_s": [min(t), max(t)],
        "tokens_s": tokens / med,
        "model_gflops": step_flops / med / 1e9,
        "mfu": step_flops / med / 1e9 / peak,
        "ratio_torch": torch_t / med,
        "loss": (torch_step.loss if k == "torch" else steps[k].loss),
        "page_faults": statistics.median(faults[k]),
        "kernel_s": statistics.median(kernel_s[k])
    }
    if k != "torch":
      row["hardware_gflop"] = steps[k].hardware_flops / 1e9
      row["hfu"] = steps[k].hardware_flops / med / 1e9 / peak
      row["compile_s"] = steps[k].compile_s
    rows.append(row)
    hfu = f'{row["hfu"]:>7.2f}' if "hfu" in row else f'{"":>7}'
    print(f'{row["side"]:<22}{med:>8.2f}{row["tokens_s"]:>9.0f}{row["model_gflops"]:>9.0f}'
          f'{row["mfu"]:>7.2f}{hfu}{row["ratio_torch"]:>8.2f}{row["loss"]:>8.3f}'
          f'{row["page_faults"]:>9.0f}{row["kernel_s"]:>7.2f}')
  if a.json:
    with open(a.json, "w") as f:
      json.dump(
          {
              "args": vars(a),
              "cpu": cpu,
              "cores": os.cpu_count(),
              "jax": jax.__version__,
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
              "model_gflop": step_flops / 1e9,
              "peaks": peaks,
              "times": times,
              "page_faults": faults,
              "kernel_s": kernel_s,
              "rows": rows,
              "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d %H:%M")
          }, f, indent=1)


if __name__ == "__main__":
  main()
