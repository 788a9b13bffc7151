"""A non-editable install carries the prompt format (package data), not just the code."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile


def test_wheel_contains_the_prompt_format(tmp_path):
    root = pathlib.Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        check=True,
    )
    wheel = next(tmp_path.glob("agent_server-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "prompts/qwen_react_v0.6.3.toml" in names
    assert "server/format/render.py" in names and "prompts/__init__.py" in names
    assert not any(n.startswith("tests/") for n in names)
