"""One style for the repository: yapf's layout and ruff's checks, as pyproject.toml configures them.

To fix a failure: `yapf -i -r -p mgjax tests benchmarks configs launch` and `ruff check . --fix`.
"""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CODE = ["mgjax", "tests", "benchmarks", "configs", "launch"]


def _run(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_code_is_laid_out_by_the_formatter():
  done = _run("yapf", "--diff", "--recursive", "--parallel", *CODE)
  assert done.returncode == 0 and not done.stdout, (
      f"files not in the repository's layout (run `yapf -i -r -p {' '.join(CODE)}`):\n{done.stdout[:4000]}{done.stderr}"
  )


def test_linter_finds_nothing():
  done = _run("ruff", "check", "--no-cache", ".")
  assert done.returncode == 0, f"ruff check found problems:\n{done.stdout[:4000]}{done.stderr}"


def test_no_pylint_directives_remain():
  # pylint is not the linter here; its directives would only be noise.
  directive = "pylint" + ": disable"
  offenders = [str(p.relative_to(ROOT)) for d in CODE for p in (ROOT / d).rglob("*.py") if directive in p.read_text()]
  assert not offenders, offenders
