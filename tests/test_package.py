"""The installable package: declared dependencies, the wheel's contents, and the commands from an empty folder."""

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_declared_dependencies_equal_requirements_txt():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    wanted = [line for line in lines if line and not line.startswith("#")]
    assert _pyproject()["project"]["dependencies"] == wanted


def test_console_scripts_point_at_command_mains():
    import importlib

    scripts = _pyproject()["project"]["scripts"]
    assert {"comoe-train", "comoe-eval", "comoe-export"} <= set(scripts)
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    for part in ("comoe_jax", "configs", "pyproject.toml", "README.md"):  # a copy: the build writes build/ there
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy
        copy(ROOT / part, source / part, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                             if (ROOT / part).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, cwd=out)
    (found,) = out.glob("comoe_jax-*.whl")
    return found


def test_the_wheel_ships_the_data_the_tokenizer_the_configs_and_the_commands(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for split in ("train", "validation", "test"):
        assert f"comoe_jax/data/comoe_mix/{split}.jsonl" in names
    assert "comoe_jax/tokenizers/smollm2-135m/tokenizer.json" in names
    assert {"comoe_jax/configs/default.py", "comoe_jax/configs/tiny.py", "comoe_jax/commands/export.py"} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "comoe-train = comoe_jax.commands.train:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_package_works_from_an_empty_folder(wheel, tmp_path):
    site, empty = tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True)
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    probe = ("import comoe_jax, comoe_jax.config as c, comoe_jax.data.loaders as d, comoe_jax.loading as l;"
             "assert comoe_jax.__file__.startswith(%r);"
             "cfg = c.load_config_file('configs/default.py'); c.load_config_file('tiny');"
             "assert len(d.load_source('mix', 'test')) == 800;"
             "assert l.load_tokenizer('smollm2-135m')('hi')['input_ids'];"
             "print(cfg.model.path)") % str(site)
    done = subprocess.run([sys.executable, "-c", probe], cwd=empty, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "smollm2-135m"
    helped = subprocess.run([sys.executable, "-m", "comoe_jax.commands.train", "--config", "tiny", "--help"],
                            cwd=empty, env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "train.steps" in helped.stdout, helped.stderr
    assert list(empty.iterdir()) == []  # nothing written where it was run
