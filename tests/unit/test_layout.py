"""The code's layers and the test suite's layout, checked: import-linter contracts (pyproject.toml
[tool.importlinter]) and the rules that keep tests independent."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_layers_hold():
    """The SAR core imports none of training, data jobs, cluster or export; nothing imports test tooling."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_test_modules_import_no_other_test_module_and_units_do_not_train():
    offenders = []
    for f in sorted((REPO / "tests").rglob("test_*.py")):
        text = f.read_text()
        for m in re.finditer(r"^\s*from tests\.[\w.]*\.(test_\w+) import", text, re.M):
            if m.group(1) != f.stem:  # a subprocess importing its own module is fine
                offenders.append(f"{f.relative_to(REPO)} imports {m.group(1)} (shared helpers go in tests/*.py)")
        if f.parent.name == "unit" and re.search(r"\bTrainer\(.*\)\.run\(\)", text):
            offenders.append(f"{f.relative_to(REPO)} runs training: integration/ is where training runs live")
        if re.search(r"^def _one_thread\(", text, re.M):
            offenders.append(f"{f.relative_to(REPO)} defines its own _one_thread (use conftest's one_thread)")
    assert not offenders, "\n".join(offenders)
