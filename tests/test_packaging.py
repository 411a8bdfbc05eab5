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
    # installed from the wheel alone (no source tree on the path), hogc.passes imports and works
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import sys, hogc, hogc.passes.fuse; assert hogc.__file__.startswith(sys.argv[1]), hogc.__file__; "
            "assert hogc.passes.fuse.__file__.startswith(sys.argv[1]); print('ok')")
    res = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert res.stdout.strip() == "ok", res.stderr
