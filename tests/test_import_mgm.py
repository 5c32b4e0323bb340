"""`python -m mgjax.convert import-mgm`: a Mini-Gemini folder as MGM saves it (LLM, CLIP tower,
ConvNeXt stem/stages, vlm_uni_* mining, mm_projector) becomes a trainer checkpoint."""

import json
import os

import numpy as np
import pytest

from mgjax.convert import checkpoints, files
from mgjax.convert.__main__ import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "stage1.py") + ":model=sample"


def _state(model, prefix: str) -> dict[str, np.ndarray]:
  return {prefix + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _mgm_folder(folder: str, *, with_towers: bool) -> dict[str, np.ndarray]:
  """A tiny MGM-7B-like folder whose shapes fit configs/models/sample.py."""
  torch.manual_seed(0)
  llm_cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5)
  tensors = _state(transformers.LlamaForCausalLM(llm_cfg), "")
  if with_towers:
    clip = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=32, patch_size=8))
    tensors.update(_state(clip, "model.vision_tower.vision_tower.vision_model."))
    convnext = transformers.ConvNextModel(
        transformers.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]))
    for name, value in _state(convnext, "").items():
      name = (name.replace("embeddings.patch_embeddings.", "stem.0.").replace(
          "embeddings.layernorm.",
          "stem.1.").replace("encoder.stages.", "stages.").replace(".downsampling_layer.", ".downsample.").replace(
              ".layers.", ".blocks.").replace(".dwconv.", ".conv_dw.").replace(".layernorm.", ".norm.").replace(
                  ".pwconv1.", ".mlp.fc1.").replace(".pwconv2.",
                                                    ".mlp.fc2.").replace(".layer_scale_parameter", ".gamma"))
      if not name.startswith("layernorm."):
        tensors["model.vision_tower_aux.vision_" + name] = value
  nn = torch.nn
  for name, module in (("vlm_uni_query_projector", nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64))),
                       ("vlm_uni_aux_projector", nn.Sequential(nn.LayerNorm(240), nn.Linear(240, 64))),
                       ("vlm_uni_val_projector", nn.Sequential(nn.LayerNorm(240), nn.Linear(240, 64))),
                       ("mm_projector", nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128)))):
    tensors.update(_state(module, f"model.{name}."))
  files.write_weights(folder, tensors)
  cfg = {
      **llm_cfg.to_dict(), "architectures": ["MGMLlamaForCausalLM"],
      "model_type": "mgm",
      "mm_hidden_size": 64,
      "mm_hidden_size_aux": 240
  }
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  return tensors


def _at(params, path: str) -> np.ndarray:
  for key in path.split("/"):  # list indices come back from the checkpoint as int or str
    params = params[key] if key in params else params[int(key)]
  return np.asarray(params)


def test_import_mgm_writes_every_part(tmp_path):
  mgm = str(tmp_path / "mgm")
  tensors = _mgm_folder(mgm, with_towers=True)
  out = str(tmp_path / "out")
  assert main(["import-mgm", f"--mgm_dir={mgm}", f"--out={out}", f"--config={CONFIG}"]) == 0
  params, config, _ = checkpoints.read_checkpoint(out)
  np.testing.assert_array_equal(_at(params, "mining/value_projector/linear/kernel"),
                                tensors["model.vlm_uni_val_projector.1.weight"].T)
  np.testing.assert_array_equal(_at(params, "projector/linear_2/kernel"), tensors["model.mm_projector.2.weight"].T)
  np.testing.assert_array_equal(
      _at(params, "vision_lowres/layers/1/mlp/fc1/kernel"),
      tensors["model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"].T)
  np.testing.assert_array_equal(_at(params, "vision_highres/stages/3/blocks/0/gamma"),
                                tensors["model.vision_tower_aux.vision_stages.3.blocks.0.gamma"])
  np.testing.assert_array_equal(_at(params, "llm/embed_tokens/embedding"), tensors["model.embed_tokens.weight"])
  assert config["model"]["vision_lowres"]["width"] == 64


def test_import_mgm_without_towers_names_the_missing_source(tmp_path, capsys):
  mgm = str(tmp_path / "mgm")
  _mgm_folder(mgm, with_towers=False)
  assert main(["import-mgm", f"--mgm_dir={mgm}", f'--out={tmp_path / "out"}', f"--config={CONFIG}"]) == 1
  err = capsys.readouterr().err
  assert "no low-res vision tower" in err and "--clip_dir" in err


# Mini-Gemini's config.json per family (mgm/model/language_model/mgm_*.py register these).
FAMILIES = {
    "gemma": ("mgm_gemma", "MGMGemmaForCausalLM", lambda: transformers.GemmaForCausalLM(
        transformers.GemmaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6))),
    "mixtral": ("mgm_mixtral", "MGMMixtralForCausalLM", lambda: transformers.MixtralForCausalLM(
        transformers.MixtralConfig(vocab_size=1024, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=4,
                                   num_experts_per_tok=2, rms_norm_eps=1e-5, sliding_window=None))),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_mgm_reads_each_family(tmp_path, family):
  """MGM-2B's (Gemma) and MGM-8x7B's (Mixtral) folders import like MGM-7B's, into a model
  config of that family (here a tiny one, given as a preset file of its own)."""
  model_type, architecture, build = FAMILIES[family]
  torch.manual_seed(0)
  llm = build()
  mgm = tmp_path / "mgm"
  tensors = _mgm_folder(str(mgm), with_towers=True)
  tensors = {
      k: v for k, v in tensors.items() if not k.startswith(("model.layers.", "model.norm", "model.embed", "lm_head"))
  }
  # The LLM's tensors and config as the released folders hold them (save_pretrained writes the
  # hub's names, e.g. Mixtral's block_sparse_moe.experts.E.w1).
  llm.save_pretrained(str(tmp_path / "llm"))
  tensors.update(files.load_tensors(str(tmp_path / "llm")))
  files.write_weights(str(mgm), tensors)
  cfg = {
      **json.loads((tmp_path / "llm" / "config.json").read_text()), "architectures": [architecture],
      "model_type": model_type,
      "mm_hidden_size": 64,
      "mm_hidden_size_aux": 240
  }
  (mgm / "config.json").write_text(json.dumps(cfg))
  preset = tmp_path / f"tiny_{family}.py"
  sample = open(os.path.join(REPO, "configs", "models", "sample.py")).read()
  llm_line = {
      "gemma": "family='gemma', hidden=128, layers=2, heads=4, kv_heads=1, head_dim=32, mlp=384,\n"
               "             rope_theta=10000.0, rope_scaling=None, norm_eps=1e-6, tie_embeddings=True,",
      "mixtral": "family='mixtral', hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, mlp=96,\n"
                 "             num_experts=4, experts_per_token=2, router_aux_loss_coef=0.0,\n"
                 "             rope_theta=1000000.0, rope_scaling=None, norm_eps=1e-5, tie_embeddings=False,"
  }[family]
  start = sample.index("llm=dict(") + len("llm=dict(")
  end = sample.index("qkv_bias=False,", start)
  preset.write_text(sample[:start] + llm_line + "\n             " + sample[end:])
  out = str(tmp_path / "out")
  assert main(["import-mgm", f"--mgm_dir={mgm}", f"--out={out}",
               f"--config={REPO}/configs/stage1.py:model={preset}"]) == 0
  params, config, _ = checkpoints.read_checkpoint(out)
  assert config["model"]["llm"]["family"] == family
  np.testing.assert_array_equal(_at(params, "llm/embed_tokens/embedding")[:1024], tensors["model.embed_tokens.weight"])
  np.testing.assert_array_equal(_at(params, "projector/linear_2/kernel"), tensors["model.mm_projector.2.weight"].T)
  if family == "mixtral":
    np.testing.assert_array_equal(_at(params, "llm/layers/1/block_sparse_moe/gate/kernel"),
                                  tensors["model.layers.1.block_sparse_moe.gate.weight"].T)
