"""The FLOPs of a train step, counted two ways and named for what they count.

Model FLOPs (MFU): what the model needs for the real tokens and images a step trains on,
counted from the weights' shapes as MaxText and PaLM count them (MaxText's
calculate_tflops_training_per_device, src/MaxText/maxtext_utils.py; PaLM, arXiv 2204.02311,
appendix B). A weight applied at a position costs 2 x its size forward (a matmul's or a
convolution's multiply-adds, the depthwise one included); training costs 3x that for a weight
the step trains (forward, input gradient, weight gradient: 6 x weights x tokens), 2x for a
frozen weight the backward pass runs through (something before it trains), 1x for one it never
does (frozen vision towers). Attention's scores and weighted values add 4 x seq_len x heads x
head_dim per token and layer forward, halved for the causal decoder as MaxText halves them
(12 x layers x seq x heads x head_dim per token when training, with the 3x); the ViT's are full
(4 x S^2 x width per layer), patch info mining's 4 x width per high-res position. Padding
counts for nothing: padded token slots and empty image slots are not real tokens or images.
Embedding lookups, norms, activations, softmax, the loss and the optimizer are not counted.

Hardware FLOPs (HFU): what XLA executes, from its cost analysis of the compiled step on one
device (under SPMD the program is the per-device one): remat's recomputation, padded slots
and empty image slots, the loss and the optimizer, everything. XLA counts a loop's body once,
whatever its trip count, and a step has up to three loops (a scanned decoder,
model.llm.scan_layers; the chunked loss, train.loss_chunk; gradient accumulation,
train.grad_accum_steps), and on TPU v5e/v6e the compiler adds its own (FSDP's collective
matmuls as windowed-einsum loops). Such a step's figures come from loop-free twins: the same
step with the layers unscanned and every loop traced as straight-line code, compiled with 1
and 2 decoder layers, cost(L) = cost(1) + (L - 1) x (cost(2) - cost(1)), exact since both
twins and the L-layer program add up op by op. A step without loops is read as compiled.
Pallas kernels (splash attention on TPU) are custom calls whose FLOPs the cost analysis leaves
out, as MaxText's compiled figures do: with splash, the hardware FLOPs have no attention (on
the sample at 128 tokens, 10% below the same step with XLA's attention) and can come out below
the model FLOPs.

Why twins: the other way, lowering one decoder layer's and one loss chunk's gradient on their
own and multiplying, measured on the sample (configs/stage2.py:data=sample:tiny, scanned
decoder, remat full, loss_chunk 32, FSDP over 8 CPU devices): the unrolled compile 2.2666
GFLOP per device, the twins 2.2666 (equal to 1e-6), the lowered bodies 1.8492 (18% short: the
layer lowered alone leaves out remat's recomputation, and even without remat its
pre-optimisation HLO counts 8% under what XLA compiles). The lowered bodies cost 0.3 s after
the step's compile, the twins two compiles of about the step's own size (73 s for both beside
37 s for the step there, on 2 loaded cores): the twins are the exact way, the lowered bodies
only the cheaper one. A loop-free step needs no twin, and the persistent compilation cache
(--compilation_cache) serves a resumed run's twins.

`mgjax.train_step.StepSetup.step_flops` gives both for a compiled step (the train log and
TensorBoard: `throughput.Window`), `mgjax.plan` prints both, and the benchmarks report both.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from mgjax.checkpoint import path_str
from mgjax.models import llm, vlm

# ------------------------------------------------------------------------------ Model FLOPs


@dataclasses.dataclass(frozen=True)
class ModelFlops:
  """Model FLOPs of training on real tokens and real images (all devices together).

  per_token: the decoder's, per real token (text or image) at the step's sequence length;
  per_image: the vision towers', patch info mining's and the projector's, per real image.
  An image is `image_tokens` copies of `image_token_id` in input_ids (None: a text-only model).
  """
  per_token: float
  per_image: float = 0.0
  image_token_id: int | None = None
  image_tokens: int = 1

  def __call__(self, tokens: float, images: float = 0.0) -> float:
    return self.per_token * tokens + self.per_image * images

  def images(self, input_ids: np.ndarray) -> float:
    """How many real images a batch's input_ids hold."""
    if self.image_token_id is None:
      return 0.0
    return float(np.count_nonzero(np.asarray(input_ids) == self.image_token_id)) / self.image_tokens


# Parameters that multiply nothing: lookups, and vectors added or scaled elementwise.
_NOT_MULTIPLIED = re.compile(r".*/(bias|scale|gamma|embedding|class_embedding)")


def model_flops(params: Mapping[str, Any], model_cfg: ml_collections.ConfigDict | Mapping[str, Any], seq_len: int,
                trained: Callable[[str], bool] = lambda path: True) -> ModelFlops:
  """The model FLOPs of a Mini-Gemini (or a decoder alone, params {'llm': ...}) trained on
  sequences of seq_len.

  params: the weights or their shapes (a nested dict as `nnx.split(...)[1].to_pure_dict()`);
  model_cfg: the `model` config section (llm, vocab_size, and for a VLM the towers,
  image_token_id and the image grid); trained(path): whether the step computes the gradient of
  the weight at that path ('llm/layers/0/self_attn/q_proj/kernel'; a LoRA-adapted weight
  counts as trained: its adapters' gradient is the weight's, contracted). A weight of a kind
  not counted here is an error, so a new module cannot leave its FLOPs out unnoticed.
  """
  leaves = [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
  llm_cfg = model_cfg["llm"]
  layers = int(llm_cfg["layers"])
  scanned = bool(llm_cfg.get("scan_layers", False))
  is_tied = bool(llm_cfg.get("tie_embeddings", False))
  stages = _Stages(layers, scanned)
  trained_stages = {stages.of(path) for path, _ in leaves if trained(path)}

  def backward_reaches(stage: int) -> bool:
    """Whether the backward pass runs through `stage`: something before it trains."""
    return any(s < stage for s in trained_stages)

  image = _ImageGeometry(model_cfg) if "vision_lowres" in params else None
  per_token = per_image = 0.0
  for path, x in leaves:
    is_output_embedding = is_tied and path == "llm/embed_tokens/embedding"
    if x.ndim < 2 or (_NOT_MULTIPLIED.fullmatch(path) and not is_output_embedding):
      continue
    unit, positions = _positions(path, llm_cfg, image)
    stage = stages.output if is_output_embedding else stages.of(path)
    factor = 3 if trained(path) else 2 if backward_reaches(stage) else 1
    flops = factor * 2 * math.prod(x.shape) * positions
    if unit == "token":
      per_token += flops
    else:
      per_image += flops

  # Weightless matmuls: attention's scores and weighted values (and mining's).
  def times(stage: int) -> int:
    return 3 if stage in trained_stages or backward_reaches(stage) else 1

  heads_dim = int(llm_cfg["heads"]) * int(llm_cfg["head_dim"])
  for i in range(layers):
    # Causal: half of the 4 x T x heads x head_dim per token, as MaxText counts it.
    per_token += times(stages.of(f"llm/layers/{i}/")) * 4 * seq_len * heads_dim / 2
  if image is not None:
    per_image += times(stages.of("vision_lowres/")) * image.vit_attention_flops
    per_image += times(stages.of("mining/")) * image.mining_attention_flops
  return ModelFlops(per_token=per_token, per_image=per_image,
                    image_token_id=int(model_cfg["image_token_id"]) if image is not None else None,
                    image_tokens=image.tokens if image is not None else 1)


class _Stages:
  """The order the forward pass runs the model's parts in: the towers (side by side), mining,
  the projector, the token embeddings, each decoder layer (one stage when scanned: the layers
  share their weights' paths), then the final norm and the output projection."""

  def __init__(self, layers: int, scanned: bool):
    self.scanned = scanned
    self.output = 4 + (1 if scanned else layers)

  def of(self, path: str) -> int:
    if path.startswith("vision_"):
      return 0
    for stage, prefix in enumerate(("mining/", "projector/", "llm/embed_tokens/"), start=1):
      if path.startswith(prefix):
        return stage
    match = re.match(r"llm/layers/(\d+)/", path)
    if path.startswith("llm/layers/"):
      return 4 if self.scanned or not match else 4 + int(match.group(1))
    return self.output  # llm/norm, llm/lm_head


class _ImageGeometry:
  """Where the vision weights of one image are applied (positions) and its attention FLOPs."""

  def __init__(self, cfg: ml_collections.ConfigDict | Mapping[str, Any]):
    lowres, highres = cfg["vision_lowres"], cfg["vision_highres"]
    grid, global_view = vlm.image_grid(cfg)
    self.views = grid * grid + int(global_view)
    self.patches = (int(lowres["image_size"]) // int(lowres["patch_size"]))**2
    class_token = lowres.get("kind", "clip") == "clip"
    self.vit_tokens = self.patches + int(class_token)
    vit_layers = int(lowres["layers"])
    feature_layer = int(lowres.get("feature_layer", -2))
    self.vit_layers_run = feature_layer % (vit_layers + 1) if feature_layer < 0 else feature_layer
    self.tokens = vlm.num_image_tokens(cfg)
    # The high-res map (1/4 of the input) every grid crop mines a window of, and the global
    # view's map downsampled by the grid.
    self.map_side = int(highres["image_size"]) // 4
    self.mined_positions = self.map_side**2 + (int(global_view) * (self.map_side // grid)**2)
    width = int(lowres["width"])
    self.vit_attention_flops = self.views * self.vit_layers_run * 4 * self.vit_tokens**2 * width
    self.mining_attention_flops = 4 * self.mined_positions * width


def _positions(path: str, llm_cfg: Mapping[str, Any], image: _ImageGeometry | None) -> tuple[str, float]:
  """('token' or 'image', how many times per token or image the weight at `path` is applied)."""
  if path.startswith("llm/"):
    if re.fullmatch(r"llm/layers/(\d+/)?block_sparse_moe/experts/w[123]", path):
      # Each token runs experts_per_token of the num_experts stacked experts.
      experts = int(llm_cfg.get("num_experts") or llm.DEFAULT_NUM_EXPERTS)
      per_token = int(llm_cfg.get("experts_per_token") or llm.DEFAULT_EXPERTS_PER_TOKEN)
      return "token", per_token / experts
    if re.fullmatch(r"llm/(layers/.*/kernel|lm_head/kernel|embed_tokens/embedding)", path):
      return "token", 1.0
  elif image is not None:
    vit_layer = re.fullmatch(r"vision_lowres/layers/(\d+)/.*/kernel", path)
    if vit_layer:  # layers after the feature layer never run
      return "image", image.views * image.vit_tokens * float(int(vit_layer.group(1)) < image.vit_layers_run)
    if path == "vision_lowres/patch_embedding/kernel":
      return "image", image.views * image.patches
    if path == "vision_highres/stem_conv/kernel":
      return "image", image.map_side**2
    stage = re.fullmatch(r"vision_highres/stages/(\d+)/.*kernel", path)
    if stage:  # stage i runs at 1/2^i of the stem's map (its downsampling conv's output too)
      return "image", (image.map_side // 2**int(stage.group(1)))**2
    if re.fullmatch(r"mining/(key|value)_projector/linear/kernel", path):
      return "image", image.mined_positions
    if re.fullmatch(r"(mining/query_projector/linear|projector/linear_\d)/kernel", path):
      return "image", image.tokens
  raise ValueError(f"mgjax.flops: no model-FLOP count for the weight {path}")


# ------------------------------------------------------------------------------ Hardware FLOPs

# TPU generations (device kinds) whose compiler runs FSDP's collective matmuls as windowed-einsum
# loops by default, and the options that turn them off for compiles that only give costs.
WINDOWED_EINSUM_KINDS = ("TPU v5 lite", "TPU v5e", "TPU v6 lite", "TPU v6e")
COST_COMPILER_OPTIONS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False
}


def cost_compiler_options(device_kind: str) -> dict | None:
  """Compiler options for a cost twin on this device kind: windowed einsum off where it is on."""
  kind = device_kind.lower()
  return COST_COMPILER_OPTIONS if any(k.lower() in kind for k in WINDOWED_EINSUM_KINDS) else None


def compiled_costs(compiled: jax.stages.Compiled) -> dict[str, float | None]:
  """XLA's figures for one call of a compiled program on one device: `flops`, and on TPU
  `modelled_seconds`, the cost model's step time (a sum of per-op roofline times). None where
  XLA gives none. A loop's body is counted once (see the module docstring)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else None
  analysis = analysis or {}
  flops = analysis.get("flops")
  seconds = analysis.get("optimal_seconds")
  if seconds is not None:
    # The v5e/v6e cost model scores each ConcatBitcast custom call at -1 s; they cost nothing.
    seconds += compiled.as_text().count('custom_call_target="ConcatBitcast"')
    if seconds <= 0:  # what the cost model gives for programs it cannot score (e.g. grouped matmuls)
      seconds = None
  return {"flops": float(flops) if flops and flops > 0 else None, "modelled_seconds": seconds}


def step_has_loops(config: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict, seq_len: int) -> bool:
  """Whether the train step runs loops XLA's cost analysis counts once (besides the compiler's)."""
  chunk = int(config.train.loss_chunk)
  return (bool(model_cfg.llm.get("scan_layers", False)) or 0 < chunk < seq_len or
          int(config.train.grad_accum_steps) > 1)


def loop_free_model(model_cfg: ml_collections.ConfigDict, layers: int) -> ml_collections.ConfigDict:
  """model_cfg with its decoder as `layers` unscanned layers: a cost twin's model."""
  twin = model_cfg.copy_and_resolve_references()
  twin.llm.layers = layers
  twin.llm.scan_layers = False
  return twin


def loop_free_costs(compile_twin: Callable[[int], jax.stages.Compiled], layers: int) -> dict[str, float | None]:
  """The compiled costs of an L-layer step from its loop-free twins: compile_twin(n) compiles
  the step with n unscanned layers and every loop unrolled; cost(L) = cost(1) + (L - 1) x
  (cost(2) - cost(1)) for each figure both twins give."""
  one = compiled_costs(compile_twin(1))
  two = compiled_costs(compile_twin(2)) if layers > 1 else one
  return {
      k: (one[k] + (layers - 1) * (two[k] - one[k]) if one[k] is not None and two[k] is not None else None) for k in one
  }


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Both FLOP counts of a compiled train step, for `throughput.Window.close`.

  hardware_per_device: XLA's FLOPs of one step on one device (None: XLA gave none);
  model: the analytic model FLOPs of the tokens and images a step trains on, all devices.
  """
  hardware_per_device: float | None
  model: ModelFlops
