"""Process settings of the entry points: the glibc malloc tunable a training process restarts with."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from mgjax import runtime

GLIBC = ("glibc", "2.36")
MADVISE = "always [madvise] never\n"


def test_hugetlb_is_added_to_whatever_tunables_the_user_set():
  assert runtime.malloc_tunables({}, MADVISE, GLIBC) == "glibc.malloc.hugetlb=1"
  assert (runtime.malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, MADVISE, GLIBC)
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


@pytest.mark.parametrize("environ, thp_mode, libc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, MADVISE, GLIBC),  # the user's own choice wins
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, MADVISE, GLIBC),  # already restarted: no loop
    ({}, "[always] madvise never\n", GLIBC),  # every mapping gets huge pages already
    ({}, "always madvise [never]\n", GLIBC),  # none can
    ({}, MADVISE, ("glibc", "2.34")),  # before the tunable existed
    ({}, MADVISE, ("", "")),  # musl and others
    ({}, MADVISE, ("glibc", "")),  # a version that could not be read
])
def test_no_restart_where_the_tunable_cannot_help_or_the_user_chose(environ, thp_mode, libc):
  assert runtime.malloc_tunables(environ, thp_mode, libc) is None


@pytest.mark.parametrize("user_setting", [None, "glibc.malloc.hugetlb=0"])
def test_train_entry_point_restarts_once_with_the_tunable(tmp_path, user_setting):
  # The config file is read while flags are parsed, after the restart: it records the
  # environment the process that trains would see. The empty workdir then stops main() before
  # any training. A restart loop would never get there and time out.
  seen = tmp_path / "seen.txt"
  config = tmp_path / "config.py"
  config.write_text(textwrap.dedent(f"""
      import os
      import ml_collections

      def get_config():
        with open({str(seen)!r}, "a") as f:
          f.write(os.environ.get("GLIBC_TUNABLES", "-") + "\\n")
        return ml_collections.ConfigDict({{"workdir": ""}})
      """))
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if user_setting:
    env["GLIBC_TUNABLES"] = user_setting
  result = subprocess.run([sys.executable, "-m", "mgjax.main", f"--config={config}"], env=env,
                          capture_output=True, text=True, timeout=120)
  assert "no workdir" in result.stderr, result.stderr[-2000:]
  starts = seen.read_text().splitlines()
  if runtime.malloc_tunables(env, runtime.thp_mode(), platform.libc_ver()) is None:
    assert starts == [user_setting or "-"]
  else:
    assert starts == ["glibc.malloc.hugetlb=1"]
