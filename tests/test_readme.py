"""The README's Python API snippet runs verbatim (in a fresh folder, on the real MovieLens-100k),
and the README's set-up commands are the ones CI runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import ml100k_data_dir, ml100k_wheel  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.MULTILINE | re.DOTALL)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def test_ci_runs_the_readme_setup_commands_verbatim():
    """The test command verbatim; the demo command verbatim but for ``--quick`` (the full demo
    takes 8 of CI's 20 minutes; it is run from a fresh clone before an issue is closed)."""
    commands = [b.strip() for b in _blocks(_section("Set-up: two commands"), "bash")]
    assert len(commands) == 2
    demo, tests = commands
    assert demo.endswith("srp4ctr demo")
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text("utf-8").splitlines()]
    assert demo + " --quick" in lines, demo
    assert tests in lines, tests


@pytest.mark.slow
def test_readme_python_api_snippet_runs_verbatim(tmp_path, ml100k_data_dir):
    (snippet,) = _blocks(_section("Python API"), "python")
    script = tmp_path / "snippet.py"
    script.write_text(snippet, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SRP4CTR_DATA_DIR"] = str(ml100k_data_dir)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "backend" in proc.stdout  # engine.describe()["config"] was printed
    assert (tmp_path / "user42.safetensors").is_file()
    assert (tmp_path / "runs" / "ctr" / "bundle.json").is_file()
