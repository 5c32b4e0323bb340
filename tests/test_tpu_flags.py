"""The TPU compiler flags (mgjax.tpu_flags): merged into LIBTPU_INIT_ARGS without overriding the
user's, known to the installed libtpu, and read by the TPU compiler that plan and the trainer use."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from mgjax import runtime, tpu_flags

OURS = [f"--{name}={value}" for name, value in tpu_flags.TPU_FLAGS.items()]


def test_flags_are_added_after_the_users_whose_values_win():
  user = ("--xla_enable_async_all_gather=false --noxla_tpu_overlap_compute_collective_tc "
          "TPU_MEGACORE=MEGACORE_DENSE --undefok=xla_something_old --xla_tpu_scoped_vmem_limit_kib=98304")
  merged = tpu_flags.libtpu_init_args(user)
  tokens = merged.split()
  # Every token of the user's is kept, in order, but their --undefok, which is merged into ours.
  assert tokens[:4] == [t for t in user.split() if not t.startswith("--undefok")]
  # The user's value of a flag wins: ours is not added after it (absl: the last one would win).
  assert "--xla_enable_async_all_gather=true" not in tokens
  assert not any(t.startswith("--xla_tpu_overlap_compute_collective_tc") for t in tokens)
  added = [f for f in OURS if not f.startswith(("--xla_enable_async_all_gather=", "--xla_tpu_overlap_compute"))]
  assert added and all(f in tokens for f in added)
  # One --undefok: the user's names and every flag added (a libtpu without one ignores it).
  undefok = [t for t in tokens if t.startswith("--undefok=")]
  assert len(undefok) == 1
  names = undefok[0].partition("=")[2].split(",")
  assert names[0] == "xla_something_old" and sorted(names[1:]) == sorted(f[2:].partition("=")[0] for f in added)
  # Applying it twice changes nothing; a user who set every flag gets their string back.
  assert tpu_flags.libtpu_init_args(merged) == merged
  assert tpu_flags.libtpu_init_args(" ".join(f.replace("=true", "=false") for f in OURS)) == " ".join(
      f.replace("=true", "=false") for f in OURS)


def test_set_libtpu_init_args_on_an_empty_environment():
  env = {}
  added = tpu_flags.set_libtpu_init_args(env)
  assert added == list(tpu_flags.TPU_FLAGS)
  assert env["LIBTPU_INIT_ARGS"].split()[:-1] == OURS
  assert tpu_flags.set_libtpu_init_args(env) == []  # already there


def test_the_trainer_sets_them_only_for_a_tpu(monkeypatch):
  monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_enable_data_parallel_all_reduce_opt=false")
  monkeypatch.setattr(runtime, "runs_on_tpu", lambda: False)
  assert runtime.set_tpu_flags(enabled=True) == []
  assert os.environ["LIBTPU_INIT_ARGS"] == "--xla_tpu_enable_data_parallel_all_reduce_opt=false"
  monkeypatch.setattr(runtime, "runs_on_tpu", lambda: True)
  assert runtime.set_tpu_flags(enabled=False) == []  # --tpu_flags=False
  added = runtime.set_tpu_flags(enabled=True)
  assert "xla_tpu_enable_data_parallel_all_reduce_opt" not in added and len(added) == len(OURS) - 1
  tokens = os.environ["LIBTPU_INIT_ARGS"].split()
  assert tokens[0] == "--xla_tpu_enable_data_parallel_all_reduce_opt=false"
  assert "--xla_tpu_enable_async_collective_fusion=true" in tokens


def test_jax_platforms_without_tpu_is_no_tpu_run(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not runtime.runs_on_tpu()


def _libtpu_env(args: str | None) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "LIBTPU_INIT_ARGS"}
  env.update({"JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "XLA_FLAGS": ""})
  if args is not None:
    env["LIBTPU_INIT_ARGS"] = args
  return env


def test_the_installed_libtpu_knows_every_flag():
  # No --undefok here: libtpu refuses to start on a flag it does not know, or a bad value.
  code = ("from jax.experimental import topologies; "
          "print(len(topologies.get_topology_desc(topology_name='v5p:2x2x1', platform='tpu').devices))")
  result = subprocess.run([sys.executable, "-c", code], env=_libtpu_env(" ".join(OURS)), capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0 and result.stdout.strip() == "4", result.stderr[-2000:]
  # ... which it does: an unknown flag is refused (so the check above is a real one).
  bad = subprocess.run([sys.executable, "-c", code], env=_libtpu_env("--xla_no_such_flag_in_libtpu=true"),
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "xla_no_such_flag_in_libtpu" in bad.stderr


# An FSDP-sharded scanned matmul stack and its gradient, compiled for v5p-8 with plan's devices.
_COMPILE_FSDP_STACK = """
import json, os, sys
from mgjax import plan, tpu_flags
if sys.argv[1] == "on":
  tpu_flags.set_libtpu_init_args(os.environ)
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(plan.tpu_devices("v5p-8")), ("fsdp",))

def loss(ws, x):
  h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w.astype(jnp.bfloat16)), None), x, ws)
  return jnp.sum(h.astype(jnp.float32)**2)

step = jax.jit(jax.value_and_grad(loss), in_shardings=(NamedSharding(mesh, P(None, "fsdp", None)),
                                                       NamedSharding(mesh, P("fsdp", None))))
compiled = step.lower(jax.ShapeDtypeStruct((4, 2048, 2048), jnp.float32),
                      jax.ShapeDtypeStruct((4096, 2048), jnp.bfloat16)).compile()
print(json.dumps({"flags": plan.compiled_with_tpu_flags(),
                  "fusions": plan._async_collective_fusions(compiled.as_text())}))
"""


@pytest.mark.parametrize("setting", ["on", "off"])
def test_plans_tpu_compiler_fuses_collectives_with_the_flags(setting):
  # plan's TPU devices compile with the flags in LIBTPU_INIT_ARGS when libtpu loads: with them
  # the weight all-gather is fused with the compute it overlaps; without, it is not.
  result = subprocess.run([sys.executable, "-c", _COMPILE_FSDP_STACK, setting], cwd=REPO, env=_libtpu_env(None),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  if setting == "on":
    assert out["flags"] == OURS and out["fusions"] > 0
  else:
    assert out["flags"] == [] and out["fusions"] == 0
