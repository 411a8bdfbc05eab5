"""passes/ ships as hogc.passes in a built wheel (the package-dir mapping in pyproject.toml)."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_passes_to_hogc_passes(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("hogc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in (ROOT / "passes").glob("*.py"):
        assert f"hogc/passes/{f.name}" in names
    assert "hogc/ir/node.py" in names and not any(n.startswith("passes/") for n in names)
