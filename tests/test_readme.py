"""The README's example is a complete program: run it exactly as written.

It trains on scikit-learn's bundled digits (no download) and prints the test
accuracy, which must be far above chance (10 %) after its few training epochs.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_programs() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def test_readme_has_one_python_program():
    programs = readme_programs()
    assert len(programs) == 1, f"expected one ```python block, found {len(programs)}"
    assert "import jpc" in programs[0]


@pytest.mark.slow
def test_readme_program_runs_as_written(tmp_path):
    pytest.importorskip("sklearn")
    (program,) = readme_programs()
    script = tmp_path / "readme_example.py"
    script.write_text(program, encoding="utf-8")
    # This checkout's `jpc`, whatever the current directory; default float32.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_ENABLE_X64": "0"}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    match = re.search(r"test accuracy (\d+\.\d)%", done.stdout)
    assert match, done.stdout
    assert 50.0 < float(match.group(1)) <= 100.0
