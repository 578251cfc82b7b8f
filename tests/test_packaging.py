from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_holds_core_hooks_and_dashboards_under_spectralscope(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("spectralscope-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for part in ("spectralscope/__init__.py", "spectralscope/hooks/__init__.py", "spectralscope/dashboards/__init__.py"):
        assert part in names
    # every module of the source tree is in it, subpackages included (a package missing from pyproject's list
    # would import in an editable install and fail in a real one)
    for folder, prefix in (("spectralscope", "spectralscope"), ("hooks", "spectralscope/hooks"),
                           ("dashboards", "spectralscope/dashboards")):
        for f in (ROOT / folder).rglob("*.py"):
            assert f"{prefix}/{f.relative_to(ROOT / folder).as_posix()}" in names, f
    tops = {n.split("/")[0] for n in names}
    assert "hooks" not in tops and "dashboards" not in tops
    assert any(n.endswith("entry_points.txt") for n in names)
