"""The TPU compiler flags mgjax trains and plans with: collective/compute overlap, as MaxText sets them.

libtpu takes its compiler flags from the LIBTPU_INIT_ARGS environment variable, once, when it
loads (when JAX starts its TPU backend, or `mgjax.plan --target` asks for a TPU topology). These
are the flags of MaxText's own TPU training recipes (its v5p Llama-2-7B script, and the
"continuation fusion for all-gather" and "data-parallel overlap" groups of its benchmark flag
library): they let the FSDP all-gathers of the weights and the gradient reductions run while the
TensorCore computes, instead of between one matmul and the next. `mgjax.main` (every entry point
that calls `runtime.setup`) sets them on a TPU host; `mgjax.plan --target` compiles with them.
`--tpu_flags=False` leaves LIBTPU_INIT_ARGS as the user set it.

A flag the user already set in LIBTPU_INIT_ARGS keeps the user's value. Every flag added is also
named in an `--undefok`, so a libtpu that no longer knows one of them ignores it instead of
refusing to start (tests/test_tpu_flags.py checks that the installed libtpu knows all of them).
This module imports nothing heavy: runtime and plan read it before JAX starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from absl import flags

ENABLED = flags.DEFINE_bool(
    "tpu_flags", True, "On a TPU (and for plan --target): add mgjax's TPU compiler flags (mgjax/tpu_flags.py: "
    "collectives overlapped with compute, as MaxText trains) to LIBTPU_INIT_ARGS; a flag set there already "
    "keeps its value. False: LIBTPU_INIT_ARGS as it is.")

# name -> value, as libtpu's own flags (--name=value).
TPU_FLAGS: dict[str, str] = {
    # Async collective fusion ("continuation fusion"): the compiler fuses a collective with the
    # computation that runs while it is in flight, so the transfer overlaps that computation
    # instead of waiting for it. The master switch of the next three.
    "xla_tpu_enable_async_collective_fusion": "true",
    # ... for all-gathers: FSDP gathers every layer's weights before its matmuls, forward and in
    # the recomputing backward pass, the largest collectives of an FSDP step.
    "xla_tpu_enable_async_collective_fusion_fuse_all_gather": "true",
    # ... over several fusions: one collective may run behind more than one compute op, so a
    # gather longer than the fusion next to it can still be hidden.
    "xla_tpu_enable_async_collective_fusion_multiple_steps": "true",
    # Overlap compute and collectives on the TensorCore itself.
    "xla_tpu_overlap_compute_collective_tc": "true",
    # All-gathers as asynchronous start/done pairs the scheduler can move apart (libtpu's
    # default is "auto").
    "xla_enable_async_all_gather": "true",
    # Collective-permutes asynchronous too: the ring steps of the collective-matmul (windowed
    # einsum) loops that the v5e/v6e compiler builds for FSDP's matmuls.
    "xla_enable_async_collective_permute": "true",
    # Pipeline the backward pass's all-gathers: the next layer's weights are gathered while the
    # current layer's gradients are computed.
    "xla_tpu_enable_ag_backward_pipelining": "true",
    # Data-parallel overlap: the gradient all-reduces over data-parallel replicas (a `data` mesh
    # axis, or slices over DCN) are scheduled against the backward pass ...
    "xla_tpu_enable_data_parallel_all_reduce_opt": "true",
    # ... and pipelined across iterations even where the reduced arrays differ in size (a
    # decoder's gradients are not all one shape).
    "xla_tpu_data_parallel_opt_different_sized_ops": "true",
    # On chips whose two TensorCores form one device (v4, v5p: megacore), keep all-gathers out
    # of megacore fusions, where they could not overlap as above. MaxText's v5p recipe sets it
    # with the rest.
    "xla_tpu_megacore_fusion_allow_ags": "false",
    # Not one of MaxText's: the compiler's bf16 propagation, off. It narrows a scanned decoder's
    # float32 weight stack, which each layer reads only as bf16, to a bf16 copy of every layer
    # converted once before the loops and held through the forward and backward passes (half the
    # weights' bytes per device: about 3 GiB for Llama-2-7B on 4 chips), instead of one layer's
    # cast at a time. The FSDP all-gathers move bf16 either way (benchmarks/RESULTS.md, "TPU
    # compile").
    "xla_jf_bf16_propagation": "false",
}


def names_set(args: str) -> set[str]:
  """The flag names a LIBTPU_INIT_ARGS string sets: --name=value, --name, and --noname (absl's
  false for a boolean), which counts as setting `name` too."""
  out = set()
  for token in args.split():
    if not token.startswith("-"):
      continue  # not a flag (some recipes put other settings there): left as it is
    name = token.lstrip("-").partition("=")[0]
    out.add(name)
    if name.startswith("no"):
      out.add(name[2:])
  return out


def libtpu_init_args(current: str, tpu_flags: Mapping[str, str] = TPU_FLAGS) -> str:
  """`current` (a LIBTPU_INIT_ARGS value) with each of `tpu_flags` it does not set added, and
  the added names in its --undefok (merged with one the user gave). Idempotent."""
  user = names_set(current)
  added = [name for name in tpu_flags if name not in user]
  if not added:
    return current
  tokens, undefok = [], []
  for token in current.split():
    flag, _, value = token.partition("=")
    if flag in ("--undefok", "-undefok"):
      undefok += [n for n in value.split(",") if n]
    else:
      tokens.append(token)
  tokens += [f"--{name}={tpu_flags[name]}" for name in added]
  undefok += [name for name in added if name not in undefok]
  return " ".join([*tokens, f"--undefok={','.join(undefok)}"])


def set_libtpu_init_args(environ: MutableMapping[str, str] = os.environ) -> list[str]:
  """Adds the flags to environ's LIBTPU_INIT_ARGS (see `libtpu_init_args`); returns the names it
  added. Before libtpu loads: it reads the variable once."""
  current = environ.get("LIBTPU_INIT_ARGS", "")
  added = [name for name in TPU_FLAGS if name not in names_set(current)]
  environ["LIBTPU_INIT_ARGS"] = libtpu_init_args(current)
  return added
