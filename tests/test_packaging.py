"""Installation layout: losses/ and aligners/ install inside opd_lightning, never as top-level modules."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], check=False, cwd=cwd, capture_output=True, text=True)


def test_losses_and_aligners_are_subpackages_only(tmp_path):
    out = run("import opd_lightning.losses as l, opd_lightning.aligners as a; print(l.__file__); print(a.__file__)",
              tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(REPO / "losses" / "__init__.py"), str(REPO / "aligners" / "__init__.py")]
    for name in ("losses", "aligners"):
        assert "ModuleNotFoundError" in run(f"import {name}", tmp_path).stderr


def test_importing_the_losses_does_not_import_lightning(tmp_path):
    out = run("import sys, opd_lightning.losses; assert 'lightning' not in sys.modules", tmp_path)
    assert out.returncode == 0, out.stderr
