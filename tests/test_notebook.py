"""notebooks/mgjax_colab.ipynb: committed clean, and executed end to end on the CPU.

The run is the notebook itself under nbclient with a python3 kernel of this interpreter,
its parameters overridden papermill-style (a cell inserted after the one tagged
`parameters`) for a tiny CPU run: the tiny sample, batch 8, a few steps per stage. XLA
compiling dominates; the kernel inherits conftest.py's environment, so it shares the
persistent compilation cache (JAX_COMPILATION_CACHE_DIR) and the 8 virtual CPU devices
with the other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nbclient
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "mgjax_colab.ipynb")


def read_notebook():
  return nbformat.read(NOTEBOOK, as_version=4)


def parameters_index(nb) -> int:
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
  return tagged[0]


def test_committed_notebook_is_valid_and_has_no_outputs():
  nb = read_notebook()
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"cell {i} holds outputs: clear them"
  assert nb.cells[parameters_index(nb)].cell_type == "code"


def inject_parameters(nb, **values) -> None:
  """What papermill does: a cell overriding the parameters, right after the tagged one."""
  source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(parameters_index(nb) + 1, cell)


def ensure_python3_kernel() -> str:
  """The python3 kernelspec; jupyter_client runs it with sys.executable (this venv's python)."""
  from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

  try:
    KernelSpecManager().get_kernel_spec("python3")
  except NoSuchKernel:
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix"], check=True)
  return "python3"


def outputs_of(cell) -> tuple[str, dict[str, list]]:
  """A cell's printed text, and its rich outputs by mime type."""
  text, rich = [], {}
  for output in cell.outputs:
    if output.output_type == "stream" and output.name == "stdout":
      text.append(output.text)
    elif output.output_type in ("display_data", "execute_result"):
      for mime, data in output.data.items():
        rich.setdefault(mime, []).append(data)
  return "".join(text), rich


def cell_containing(nb, snippet: str):
  found = [c for c in nb.cells if c.cell_type == "code" and snippet in c.source]
  assert len(found) == 1, f"expected one code cell containing {snippet!r}, found {len(found)}"
  return found[0]


def test_notebook_runs_end_to_end_on_cpu(tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  nb = read_notebook()
  workdir = tmp_path / "runs"
  inject_parameters(nb, DATA_PRESET="sample:tiny", DATA_DIR=str(tmp_path / "data"), WORKDIR=str(workdir), BATCH_SIZE=8,
                    STEPS_PRETRAIN=3, STEPS_STAGE1=6, STEPS_STAGE2=3, MAX_NEW_TOKENS=8, CONFIG_OVERRIDES={
                        "train.eval_batch_size": 8,
                        "train.log_every": 1,
                        "eval.max_new_tokens": 8
                    })
  client = nbclient.NotebookClient(nb, kernel_name=ensure_python3_kernel(), timeout=600,
                                   resources={"metadata": {
                                       "path": str(tmp_path)
                                   }})
  client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails
  executed = os.path.join(tmp_path, "executed.ipynb")
  nbformat.write(nb, executed)  # kept beside the run for a look when an assertion below fails

  for stage in ("pretrain", "stage1", "stage2"):
    for name in ("report.json", "report.md", "report.png", "metrics.jsonl"):
      assert (workdir / stage / name).exists(), f"{stage}/{name} missing (see {executed})"
  report = json.loads((workdir / "stage2" / "report.json").read_text())
  assert report["complete"] and set(report) >= {"stage1", "stage2"}

  # The installer cell skipped installing: mgjax is importable in this venv.
  text, _ = outputs_of(cell_containing(nb, "REPO_URL ="))
  assert "mgjax is already installed" in text
  # The sizing cell kept the injected values.
  text, _ = outputs_of(cell_containing(nb, "BACKEND = jax.default_backend()"))
  assert "backend cpu" in text and "pretraining: batch 8, 3 steps" in text and "stage 1: batch 8, 6 steps" in text and "stage 2: batch 8, 3 steps" in text
  # The sample records, with an image.
  text, rich = outputs_of(cell_containing(nb, "def read_record"))
  assert "<GEN>" in text and "<image>" in text and rich.get("image/png")
  # All three phases ran their steps, each from the one before (stage 1 from pretraining).
  assert "pretraining: 3 steps" in outputs_of(cell_containing(nb, "pretrain = train.run"))[0]
  assert json.loads((workdir / "stage1" / "report.json").read_text())["init_from_workdir"] == str(workdir / "pretrain")
  assert "stage 1: 6 steps" in outputs_of(cell_containing(nb, "stage1 = train.run"))[0]
  assert "stage 2: " in outputs_of(cell_containing(nb, "stage2 = train.run"))[0]
  # The report: report.md's table as markdown, report.png as an image.
  _, rich = outputs_of(cell_containing(nb, "report_md ="))
  assert any("| val_generation | format_rate |" in m for m in rich.get("text/markdown", []))
  assert rich.get("image/png")
  # The validation-loss chart.
  _, rich = outputs_of(cell_containing(nb, "fig = Figure("))
  assert rich.get("image/png")
  # The chat: a generation request (and its extracted prompt, None or not) and an image question.
  text, _ = outputs_of(cell_containing(nb, "extract_image_prompt(answer)"))
  assert "<GEN>" in text and "assistant:" in text and "text-to-image prompt:" in text
  text, rich = outputs_of(cell_containing(nb, 'read_record("val_understanding", 1)'))
  assert "<image>" in text and "assistant:" in text and rich.get("image/png")
