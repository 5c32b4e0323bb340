"""The README's test setup is what CI runs, and it installs what the tests use."""

import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO


def readme_test_setup() -> list[str]:
  """The command lines of the Quickstart's "Set up and run the tests" block."""
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  match = re.search(r"^Set up and run the tests.*?```bash\n(.*?)```", readme, re.S | re.M)
  assert match, "README.md's Quickstart has no 'Set up and run the tests' bash block"
  return match.group(1).strip().splitlines()


def test_ci_runs_the_readme_test_setup_word_for_word():
  with open(os.path.join(REPO, ".ci", "run")) as f:
    lines = [line.rstrip("\n") for line in f]
  # What .ci/run adds around the README's lines: its interpreter, comments, stopping at the
  # first failure, and starting from the repository root.
  boilerplate = ("#", "set -euo pipefail", 'cd "$(dirname "$0")/.."')
  commands = [line for line in lines if line.strip() and not line.startswith(boilerplate)]
  assert commands == readme_test_setup()


def test_the_setup_installs_the_browser_the_review_page_tests_drive():
  """The packages the README's apt-get line installs are the ones that own the programs
  tests/test_data_review.py runs (Debian's; dpkg says who owns a file)."""
  [apt] = [line for line in readme_test_setup() if "apt-get install" in line]
  packages = apt.split("apt-get install -y", 1)[1].split()
  with open(os.path.join(REPO, "tests", "test_data_review.py")) as f:
    programs = re.search(r'^CHROMIUM, CHROMEDRIVER = "(.+?)", "(.+?)"$', f.read(), re.M).groups()
  if not shutil.which("dpkg"):
    pytest.skip("not a Debian system: no dpkg to ask which package owns a file")
  for program in programs:
    owner = subprocess.run(["dpkg", "-S", program], capture_output=True, text=True)
    assert owner.returncode == 0, f"{program}: no package owns it ({owner.stderr.strip()}); run the README's setup"
    assert owner.stdout.split(":")[0] in packages, (program, owner.stdout, packages)
