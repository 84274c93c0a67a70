"""The README's commands stay true: the Quick start shape CI relies on, and every config example."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from vcritic.cli import _split_preset
from vcritic.config import load

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def quick_start() -> list[str]:
    section = README.split("## Quick start", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_two_commands_main_job_first():
    first, second = quick_start()
    assert first.startswith("python3 -m venv .venv") and first.endswith(".venv/bin/python jobs/train.py")
    assert second.startswith("python3 -m venv .venv") and second.endswith("-m pytest")


def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    extract = re.search(r"test_cmd=\$\((.*)\)\n", script).group(1)
    out = subprocess.run(["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert out == quick_start()[1]


@pytest.mark.parametrize("line", re.findall(r"python jobs/train\.py[^\n`]*", README.replace("\\\n", " ")))
def test_every_readme_train_command_is_a_valid_config(line):
    args = shlex.split(line)[2:]
    preset, overrides = _split_preset(args)
    cfg = load(preset, overrides)
    assert cfg.model.backbone.name
