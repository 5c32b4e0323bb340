"""Writes an mgjax validation split as an lmms-eval task, so lmms-eval scores a checkpoint
on the records mgjax's own evaluation scores (and any other lmms-eval model on them too).

  python -m mgjax.lmms_tasks --workdir=runs/stage1 --split=val_understanding --out=lmms_tasks
  python -m lmms_eval --model mgjax --model_args workdir=runs/stage1,batch_size=32 \\
      --tasks mgjax_val_understanding --include_path lmms_tasks --output_path results

The split is the one the run trained beside (its data config and data_dir). OUT/<task>/
gets the task YAML (mgjax/lmms_task_files/mgjax_split.yaml, with the task's name and the
run's eval.max_new_tokens), its functions, and data/test.parquet: one document per
assistant turn, in the order mgjax's evaluation decodes them, so at the run's
eval.batch_size lmms-eval gets the same answers and the same accuracy. Needs the eval extra
(the `datasets` package writes the parquet).
"""

from __future__ import annotations

import json
import os
import shutil
import string
import sys
from typing import Any

import ml_collections
from absl import app, flags
from etils import epath

from mgjax import checkpoint, runtime
from mgjax.data import datasets
from mgjax.evaluators import decoding

TASK_FILES = epath.Path(__file__).parent / "lmms_task_files"


def task_name(split: str) -> str:
  return f"mgjax_{split}"


def documents(source) -> list[dict[str, Any]]:
  """One document per assistant turn of a split (decoding.assistant_turns), in order."""
  docs = []
  for i in range(len(source)):
    record_id = source[i]["id"]
    record_id = record_id.decode() if isinstance(record_id, bytes) else str(record_id)
    for turn, (messages, images, reference) in enumerate(decoding.assistant_turns([source[i]])):
      docs.append({
          "question_id": f"{record_id}#{turn}",
          "record": i,
          "messages": json.dumps(messages, ensure_ascii=False),
          "images": [{
              "bytes": data,
              "path": None
          } for data in images],
          "answer": reference,
      })
  return docs


def write_task(source, split: str, out: str, *, max_new_tokens: int) -> str:
  """Writes OUT/<task>/ (YAML, functions, data/test.parquet); returns that folder."""
  import datasets as hf_datasets  # the eval extra's; only this command needs it

  folder = os.path.join(out, task_name(split))
  os.makedirs(os.path.join(folder, "data"), exist_ok=True)
  features = hf_datasets.Features({
      "question_id": hf_datasets.Value("string"),
      "record": hf_datasets.Value("int64"),
      "messages": hf_datasets.Value("string"),
      "images": hf_datasets.Sequence(hf_datasets.Image()),
      "answer": hf_datasets.Value("string"),
  })
  docs = documents(source)
  if not docs:
    raise ValueError(f"split {split} holds no assistant turn to evaluate")
  table = hf_datasets.Dataset.from_list(docs, features=features)
  table.to_parquet(os.path.join(folder, "data", "test.parquet"))
  template = string.Template((TASK_FILES / "mgjax_split.yaml").read_text())
  with open(os.path.join(folder, f"{task_name(split)}.yaml"), "w") as f:
    f.write(template.substitute(task=task_name(split), max_new_tokens=max_new_tokens))
  shutil.copy(TASK_FILES / "mgjax_split_task.py", os.path.join(folder, "mgjax_split_task.py"))
  return folder


if __name__ == "__main__":
  # The flags exist only when this module is the program: another entry point (mgjax.recipe,
  # mgjax.predict) defines --workdir too, and both may be imported in one process.
  _WORKDIR = flags.DEFINE_string("workdir", None, "A trained workdir (or one of its checkpoints/<step> folders).")
  _SPLIT = flags.DEFINE_string("split", "val_understanding", "The validation split to write.")
  _OUT = flags.DEFINE_string("out", None, "The folder to write the task into (lmms-eval's --include_path).")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the dataset was built, if not where the run read it.")

  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value or not _OUT.value:
      raise app.UsageError("pass --workdir=RUN and --out=FOLDER")
    try:
      run_dir, step = checkpoint.locate(_WORKDIR.value)
      config = checkpoint.Checkpoints(run_dir, read_only=True).meta(step)["config"]
    except checkpoint.CheckpointError as e:
      sys.exit(f"error: {e}")
    data_dir = _DATA_DIR.value or config["data"]["data_dir"]
    dataset = datasets.load_built(ml_collections.ConfigDict(config["data"]["recipe"]), data_dir)
    if dataset is None:
      sys.exit(f"error: no build of the run's dataset in {data_dir}: build it (python -m mgjax.data.build) or pass "
               "--data_dir where it is")
    folder = write_task(datasets.open_split(dataset, _SPLIT.value), _SPLIT.value, _OUT.value,
                        max_new_tokens=int(config["eval"]["max_new_tokens"]))
    print(f"wrote {folder}: run it with --tasks {task_name(_SPLIT.value)} --include_path {_OUT.value}")

  app.run(main, flags_parser=runtime.parse_flags)
