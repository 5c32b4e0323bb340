"""A source that loses all or most of its records stops the build, naming why.

A wrong image_root or a renamed field rejects a whole source; the build must not go on and
train on the rest with exit 0. The same holds for a share under min_kept_share, which a
recipe (or one source) can lower where losing more is expected.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from conftest import sample_recipe_over_files
from mgjax.data import build, datasets

REPO = pathlib.Path(__file__).resolve().parents[1]


def _recipe(root: pathlib.Path):
  return sample_recipe_over_files(root, "lost")


def test_a_wrong_image_root_stops_the_build_naming_the_source_and_the_reason(tmp_path):
  cfg = _recipe(tmp_path / "sources")
  cfg.sources[0]["image_root"] = "pictures"  # the images are in images/
  with pytest.raises(build.SourceLost) as lost:
    build.build(cfg, str(tmp_path / "data"))
  message = str(lost.value)
  assert "source 'mgm_understanding' (" in message and "read 16, rejected {'missing_image': 16}" in message
  assert "kept 0 (0%; min_kept_share 0.5). Commonest reasons: missing_image (16), e.g. " in message
  assert str(tmp_path / "sources/pictures") in message  # the path it looked for shows the mistake
  assert "mgm_generation" not in message and "lima" not in message  # the sources that are fine
  assert not datasets.dataset_dir(cfg, str(tmp_path / "data")).exists()


def test_a_source_under_its_min_kept_share_stops_the_build_and_a_lower_share_builds_it(tmp_path):
  cfg = _recipe(tmp_path / "sources")
  lima = tmp_path / "sources/lima/train.jsonl"
  good = lima.read_text().splitlines()
  assert len(good) == 8
  # 8 good conversations, 10 empty ones: 44% kept.
  lima.write_text("\n".join(good + [json.dumps({"conversations": []})] * 10) + "\n")
  with pytest.raises(
      build.SourceLost,
      match=r"(?s)source 'lima' \(.*\): read 18, rejected \{'empty_conversation': 10\}, duplicates 0: "
      r"kept 8 \(44%; min_kept_share 0\.5\)\. Commonest reasons: empty_conversation \(10\), e\.g\. "
      r".*train\.jsonl: line 9: .*lower min_kept_share for that source"):
    build.build(cfg, str(tmp_path / "data"))

  cfg.sources[2]["min_kept_share"] = 0.4  # this source's own share
  built = build.build(cfg, str(tmp_path / "data"))
  card = json.loads(pathlib.Path(built.data_card).read_text())
  assert card["sources"]["lima"]["kept"] == 8 and card["sources"]["lima"]["rejected"] == {"empty_conversation": 10}
  # The share decides whether a build stops, not what it holds: the same version either way.
  del cfg.sources[2]["min_kept_share"]
  cfg.min_kept_share = 0.4
  assert datasets.load_built(cfg, str(tmp_path / "data")) == built


def test_min_kept_share_must_be_a_share(tmp_path):
  cfg = _recipe(tmp_path / "sources")
  cfg.min_kept_share = 50
  with pytest.raises(ValueError, match=r"source 'mgm_understanding': min_kept_share=50(\.0)?; it is a share"):
    build.build(cfg, str(tmp_path / "data"))


# ------------------------------------------------------------------------------ the command line

_NAMESPACE = shutil.which("unshare")


def _in_own_mount(tmp_path, mount: str, data_dir: pathlib.Path) -> subprocess.CompletedProcess:
  """The build command with data_dir on a filesystem of its own (a user and mount namespace:
  no root needed, and root cannot write through a read-only mount either)."""
  data_dir.mkdir()
  script = (f"mount -t tmpfs -o size=256k tmpfs {data_dir} && {mount} exec {sys.executable} -m mgjax.data.build "
            f"--config={REPO}/configs/data/sample.py:tiny --data_dir={data_dir}")
  return subprocess.run([_NAMESPACE, "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


@pytest.fixture
def namespaces(tmp_path):
  if _NAMESPACE is None:
    pytest.skip("needs unshare (util-linux) to give the data_dir a filesystem of its own")
  probe = subprocess.run([_NAMESPACE, "--user", "--map-root-user", "--mount", "true"], capture_output=True)
  if probe.returncode:
    pytest.skip(f"this machine allows no user namespaces: {probe.stderr.decode()[-200:]}")


@pytest.mark.parametrize("fault", ["read_only", "full"])
def test_the_build_command_ends_in_one_line_when_it_cannot_write(tmp_path, namespaces, fault):
  data_dir = tmp_path / "data"
  remount = f"mount -o remount,ro {data_dir} &&" if fault == "read_only" else ""
  proc = _in_own_mount(tmp_path, remount, data_dir)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  if fault == "read_only":
    assert last.startswith(f"error: cannot write {data_dir}")
    assert "Read-only file system): the build writes into --data_dir=" in last and "permissions" in last
  else:
    assert last.startswith(f"error: no space left writing {data_dir}") and "No space left on device" in last
    assert "free space on the disk of --data_dir=" in last and "then rerun" in last
