"""mgjax.convert: folders in (single, sharded, pickle, older key names), errors that name the
tensors, export that transformers reloads, and the CLI round trip through the trainer's init_from."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from mgjax import config_files  # noqa: E402
from mgjax import stages  # noqa: E402
from mgjax.convert import ConversionError, WeightsError, files, import_hf_llm, load_hf_lm  # noqa: E402
from mgjax.convert import llm_weights  # noqa: E402
from mgjax.convert.__main__ import main as cli  # noqa: E402
from mgjax.models import vlm  # noqa: E402
from mgjax.models.llm import DecoderLM  # noqa: E402
from test_llm_parity import TOLERANCE, VOCAB, hf_logits, random_ids, tiny_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(transformers model, its folder) of a tiny Llama-3 (rope scaling on)."""
  hf = tiny_hf_model("llama3")
  folder = str(tmp_path_factory.mktemp("llama3"))
  hf.save_pretrained(folder)
  return hf, folder


def _copy_with(src: str, dst, *, tensors=None, config=None) -> str:
  """A copy of folder src with its tensors and/or config.json replaced."""
  os.makedirs(dst, exist_ok=True)
  cfg = files.read_config(src) if config is None else config
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  files.write_safetensors(os.path.join(dst, "model.safetensors"),
                          files.load_tensors(src) if tensors is None else tensors)
  return str(dst)


def _assert_same_logits(model, hf, ids=None):
  ids = random_ids() if ids is None else ids
  diff = np.abs(np.asarray(model(ids)) - hf_logits(hf, ids)).max()
  assert diff < TOLERANCE, diff


# ------------------------------------------------------------------------------ reading


def test_sharded_safetensors_with_index(tmp_path):
  hf = tiny_hf_model("qwen2")
  hf.save_pretrained(tmp_path, max_shard_size="20KB")
  shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
  assert len(shards) > 1 and "model.safetensors.index.json" in os.listdir(tmp_path)
  _assert_same_logits(load_hf_lm(str(tmp_path)), hf)


def test_missing_shard_is_named(tmp_path):
  tiny_hf_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
  shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[-1]
  os.remove(tmp_path / shard)
  with pytest.raises(WeightsError, match=shard):
    load_hf_lm(str(tmp_path))


def test_missing_config_or_weights_is_named(tmp_path, llama):
  with pytest.raises(WeightsError, match="config.json"):
    load_hf_lm(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(files.read_config(llama[1])))
  with pytest.raises(WeightsError, match="model.safetensors"):
    load_hf_lm(str(tmp_path))


def test_pickle_refused_unless_allowed(tmp_path, llama):
  hf, folder = llama
  (tmp_path / "config.json").write_text(json.dumps(files.read_config(folder)))
  torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
  with pytest.raises(WeightsError, match="allow_pickle"):
    load_hf_lm(str(tmp_path))
  _assert_same_logits(load_hf_lm(str(tmp_path), allow_pickle=True), hf)


def test_bfloat16_safetensors_load(tmp_path, llama):
  """bfloat16 weights (how most releases ship) read exactly: the same logits as the bf16 weights
  upcast in torch."""
  copy.deepcopy(llama[0]).to(torch.bfloat16).save_pretrained(tmp_path)
  # Round the weights only: .to(bfloat16) would round torch's RoPE frequency buffer as well.
  reference = copy.deepcopy(llama[0])
  with torch.no_grad():
    for p in reference.parameters():
      p.copy_(p.to(torch.bfloat16).float())
  _assert_same_logits(load_hf_lm(str(tmp_path)), reference)


@pytest.mark.parametrize("layout", ["language_model", "model.language_model", "mgm"])
def test_older_and_wrapped_key_names(tmp_path, llama, layout):
  """LLaVA-style wrappers (old and current names) and a Mini-Gemini checkpoint, whose vision
  tensors are left out and reported."""
  hf, folder = llama
  tensors = files.load_tensors(folder)
  config = files.read_config(folder)
  if layout == "language_model":
    renamed = {("language_model." + n): t for n, t in tensors.items()}
  elif layout == "model.language_model":
    renamed = {n.replace("model.", "model.language_model.", 1): t for n, t in tensors.items()}
  else:
    renamed = dict(tensors)
    renamed["model.mm_projector.0.weight"] = np.zeros((32, 16), np.float32)
    renamed["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = np.ones(16, np.float32)
    config.update(model_type="mgm", architectures=["MGMLlamaForCausalLM"], mm_hidden_size=16)
  path = _copy_with(folder, tmp_path, tensors=renamed, config=config)
  _assert_same_logits(load_hf_lm(path), hf)
  unused = import_hf_llm(path)[3]
  assert unused == ([
      "model.mm_projector.0.weight", "model.vision_tower.vision_tower.vision_model.post_layernorm.weight"
  ] if layout == "mgm" else [])


def test_legacy_config_keys(tmp_path, llama):
  """transformers 4's rope_theta + rope_scaling (what downloaded Llama-3 folders hold)."""
  hf, folder = llama
  config = files.read_config(folder)
  rope = dict(config.pop("rope_parameters"))
  config["rope_theta"] = rope.pop("rope_theta")
  config["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in rope.items()}
  _assert_same_logits(load_hf_lm(_copy_with(folder, tmp_path, config=config)), hf)


def test_unsupported_architecture_is_named(tmp_path, llama):
  config = {**files.read_config(llama[1]), "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]}
  with pytest.raises(ConversionError, match="moe models are not implemented in mgjax; supported: llama"):
    load_hf_lm(_copy_with(llama[1], tmp_path, config=config))


# ------------------------------------------------------------------------------ mismatches


def test_missing_tensor_is_named(tmp_path, llama):
  tensors = files.load_tensors(llama[1])
  del tensors["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ConversionError, match=r"missing tensors \(1\):\s+model\.layers\.1\.mlp\.up_proj\.weight"):
    load_hf_lm(_copy_with(llama[1], tmp_path, tensors=tensors))


def test_wrong_shape_is_named(tmp_path, llama):
  tensors = files.load_tensors(llama[1])
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
  with pytest.raises(ConversionError,
                     match=r"model\.layers\.0\.self_attn\.k_proj\.weight: \S+ \(8, 32\) vs config \(16, 32\)"):
    load_hf_lm(_copy_with(llama[1], tmp_path, tensors=tensors))


def test_unexpected_tensor_is_named(tmp_path, llama):
  tensors = files.load_tensors(llama[1])
  tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((64, 32), np.float32)  # a third layer
  with pytest.raises(ConversionError, match=r"unexpected tensors \(1\):\s+model\.layers\.2\.mlp\.up_proj\.weight"):
    load_hf_lm(_copy_with(llama[1], tmp_path, tensors=tensors))


def test_wrong_family(tmp_path, llama):
  """Qwen2 weights under a Llama config.json: the biases are named, with the likely cause; and a
  checkpoint whose family differs from the model config the user asked for."""
  qwen = tiny_hf_model("qwen2")
  qwen.save_pretrained(tmp_path / "qwen")
  config = {**files.read_config(str(tmp_path / "qwen")), "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
  path = _copy_with(str(tmp_path / "qwen"), tmp_path / "mislabelled", config=config)
  with pytest.raises(ConversionError, match=r"(?s)model\.layers\.0\.self_attn\.q_proj\.bias.*qwen2"):
    load_hf_lm(path)
  wanted, _ = llm_weights.llm_config_from_hf(files.read_config(llama[1]))
  with pytest.raises(ConversionError, match=r"wrong family.*\n.*family: config 'llama' vs"):
    import_hf_llm(str(tmp_path / "qwen"), llm=wanted)


# ------------------------------------------------------------------------------ export


@pytest.mark.parametrize("name", ["llama3", "gemma", "qwen2"])
def test_export_reloads_in_transformers(tmp_path, name):
  hf = tiny_hf_model(name)
  hf.save_pretrained(tmp_path / "in")
  params, llm_cfg, _, _ = import_hf_llm(str(tmp_path / "in"))
  # Small shards: the sharded layout (with its index) is what transformers must reload.
  written = llm_weights.export_hf_llm(params, llm_cfg, str(tmp_path / "out"), max_shard_bytes=40_000)
  assert any(f.endswith("model.safetensors.index.json") for f in written)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
  ids = random_ids()
  assert np.abs(hf_logits(reloaded, ids) - hf_logits(hf, ids)).max() < TOLERANCE
  _assert_same_logits(load_hf_lm(str(tmp_path / "out")), hf)


def test_scanned_layout_imports_and_exports_the_same_model(tmp_path, llama):
  # model.llm.scan_layers: the import stacks the layers along a leading axis, the scanned
  # decoder gives transformers' logits, and the export unstacks them for transformers again.
  hf, folder = llama
  found, _ = llm_weights.llm_config_from_hf(files.read_config(folder))
  params, llm_cfg, vocab, _ = import_hf_llm(folder, llm={**found, "scan_layers": True})
  assert llm_cfg["scan_layers"] and params["layers"]["self_attn"]["q_proj"]["kernel"].shape[0] == found["layers"]
  model = DecoderLM(vocab_size=vocab, **llm_cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, params)
  _assert_same_logits(nnx.merge(graphdef, state), hf)
  llm_weights.export_hf_llm(params, llm_cfg, str(tmp_path / "out"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
  ids = random_ids()
  assert np.abs(hf_logits(reloaded, ids) - hf_logits(hf, ids)).max() < TOLERANCE


# ------------------------------------------------------------------------------ CLI


def test_cli_import_init_from_export(tmp_path, llama, capsys):
  """import-llm writes a checkpoint the trainer's init_from loads into the whole MiniGemini;
  export-llm writes it back out for transformers, with the same logits."""
  hf, folder = llama
  out = str(tmp_path / "imported")
  # The sample preset's LLM is not this one: without the flag the mismatch stops the import.
  assert cli(["import-llm", f"--hf_dir={folder}", f"--out={out}"]) == 1
  err = capsys.readouterr().err
  assert "model.llm does not match" in err and "add --llm_from_checkpoint" in err
  assert cli(["import-llm", f"--hf_dir={folder}", f"--out={out}", "--llm_from_checkpoint"]) == 0
  printed = capsys.readouterr().out
  assert f"--config.init_from={out}" in printed and "--config.model.llm.hidden=32" in printed

  # What the trainer does with --config.init_from=OUT, given the printed overrides.
  meta_config = json.loads(open(os.path.join(out, "checkpoints", "0", "meta", "metadata")).read())["config"]
  model_cfg = config_files.load_config_file("configs/stage1.py").model.to_dict()
  model_cfg.update(llm=meta_config["model"]["llm"], vocab_size=meta_config["model"]["vocab_size"])
  import ml_collections
  model_cfg = ml_collections.ConfigDict(model_cfg)
  abstract = nnx.eval_shape(lambda: vlm.MiniGemini(model_cfg, rngs=nnx.Rngs(0)))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                        nnx.to_pure_dict(nnx.split(abstract)[1]))
  params, info = stages.load_init_params(out, target)
  assert info["step"] == 0
  embedding = np.asarray(params["llm"]["embed_tokens"]["embedding"])
  assert embedding.shape == (1024, 32)  # padded to the sample's vocab_size
  np.testing.assert_array_equal(embedding[:VOCAB], hf.model.embed_tokens.weight.detach().numpy())

  # The run's tokenizer goes out with the weights (a word-level one: this LLM's vocabulary is
  # made up).
  import tokenizers
  words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "</s>": 1, "hello": 2}, unk_token="<unk>"))
  transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>",
                                       eos_token="</s>").save_pretrained(os.path.join(out, "tokenizer"))
  exported = str(tmp_path / "exported")
  assert cli(["export-llm", f"--workdir={out}", f"--out={exported}"]) == 0
  # It says what it wrote: every file, weights, config and tokenizer.
  on_disk = sorted(os.listdir(exported))
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(on_disk)
  assert f"wrote {len(on_disk)} file(s) to {exported} ({', '.join(on_disk)}) from " in capsys.readouterr().out
  assert transformers.AutoTokenizer.from_pretrained(exported).eos_token_id == 1
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
  ids = random_ids()
  np.testing.assert_allclose(hf_logits(reloaded, ids)[..., :VOCAB], hf_logits(hf, ids), atol=TOLERANCE)
  # The context length the source claims, not a made-up one.
  assert reloaded.config.max_position_embeddings == hf.config.max_position_embeddings != 4096
