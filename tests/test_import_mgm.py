"""`python -m mgjax.convert import-mgm`: a Mini-Gemini folder as MGM saves it (LLM, CLIP tower,
ConvNeXt stem/stages, vlm_uni_* mining, mm_projector) becomes a trainer checkpoint."""

import json
import os

import numpy as np
import pytest

from mgjax.convert import files, workdir
from mgjax.convert.__main__ import main

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'stage1.py') + ':model=sample'


def _state(model, prefix: str) -> dict[str, np.ndarray]:
  return {prefix + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _mgm_folder(folder: str, *, with_towers: bool) -> dict[str, np.ndarray]:
  """A tiny MGM-7B-like folder whose shapes fit configs/models/sample.py."""
  torch.manual_seed(0)
  llm_cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384,
                                     num_hidden_layers=4, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5)
  tensors = _state(transformers.LlamaForCausalLM(llm_cfg), '')
  if with_towers:
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
      image_size=32, patch_size=8))
    tensors.update(_state(clip, 'model.vision_tower.vision_tower.vision_model.'))
    convnext = transformers.ConvNextModel(transformers.ConvNextConfig(
      hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]))
    for name, value in _state(convnext, '').items():
      name = (name.replace('embeddings.patch_embeddings.', 'stem.0.')
              .replace('embeddings.layernorm.', 'stem.1.').replace('encoder.stages.', 'stages.')
              .replace('.downsampling_layer.', '.downsample.').replace('.layers.', '.blocks.')
              .replace('.dwconv.', '.conv_dw.').replace('.layernorm.', '.norm.')
              .replace('.pwconv1.', '.mlp.fc1.').replace('.pwconv2.', '.mlp.fc2.')
              .replace('.layer_scale_parameter', '.gamma'))
      if not name.startswith('layernorm.'):
        tensors['model.vision_tower_aux.vision_' + name] = value
  nn = torch.nn
  for name, module in (('vlm_uni_query_projector', nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64))),
                       ('vlm_uni_aux_projector', nn.Sequential(nn.LayerNorm(240), nn.Linear(240, 64))),
                       ('vlm_uni_val_projector', nn.Sequential(nn.LayerNorm(240), nn.Linear(240, 64))),
                       ('mm_projector', nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128)))):
    tensors.update(_state(module, f'model.{name}.'))
  files.write_weights(folder, tensors)
  cfg = {**llm_cfg.to_dict(), 'architectures': ['MGMLlamaForCausalLM'], 'model_type': 'mgm',
         'mm_hidden_size': 64, 'mm_hidden_size_aux': 240}
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  return tensors


def _at(params, path: str) -> np.ndarray:
  for key in path.split('/'):  # list indices come back from the checkpoint as int or str
    params = params[key] if key in params else params[int(key)]
  return np.asarray(params)


def test_import_mgm_writes_every_part(tmp_path):
  mgm = str(tmp_path / 'mgm')
  tensors = _mgm_folder(mgm, with_towers=True)
  out = str(tmp_path / 'out')
  assert main(['import-mgm', f'--mgm_dir={mgm}', f'--out={out}', f'--config={CONFIG}']) == 0
  params, config, _ = workdir.read_checkpoint(out)
  np.testing.assert_array_equal(_at(params, 'mining/value_projector/linear/kernel'),
                                tensors['model.vlm_uni_val_projector.1.weight'].T)
  np.testing.assert_array_equal(_at(params, 'projector/linear_2/kernel'),
                                tensors['model.mm_projector.2.weight'].T)
  np.testing.assert_array_equal(
    _at(params, 'vision_lowres/layers/1/mlp/fc1/kernel'),
    tensors['model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight'].T)
  np.testing.assert_array_equal(_at(params, 'vision_highres/stages/3/blocks/0/gamma'),
                                tensors['model.vision_tower_aux.vision_stages.3.blocks.0.gamma'])
  np.testing.assert_array_equal(_at(params, 'llm/embed_tokens/embedding'),
                                tensors['model.embed_tokens.weight'])
  assert config['model']['vision_lowres']['width'] == 64


def test_import_mgm_without_towers_names_the_missing_source(tmp_path, capsys):
  mgm = str(tmp_path / 'mgm')
  _mgm_folder(mgm, with_towers=False)
  assert main(['import-mgm', f'--mgm_dir={mgm}', f'--out={tmp_path / "out"}',
               f'--config={CONFIG}']) == 1
  err = capsys.readouterr().err
  assert 'no low-res vision tower' in err and '--clip_dir' in err
