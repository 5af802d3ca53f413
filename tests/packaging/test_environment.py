"""environment.yml (conda users) must list exactly the dependencies of pyproject.toml."""
from __future__ import annotations

import re

try:
    import tomllib
except ModuleNotFoundError:        # Python 3.10
    import tomli as tomllib

import yaml

from tests.conftest import PROJECT_ROOT


def _normalise(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    environment = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))
    conda_python = next(item for item in environment["dependencies"] if isinstance(item, str) and
                        item.startswith("python"))
    assert conda_python.replace("python", "") == project["requires-python"]
    listed = {_normalise(r) for r in pip_section if not r.startswith("-e")}
    assert listed == {_normalise(r) for r in project["dependencies"]}, (
        "environment.yml and pyproject.toml list different dependencies: "
        f"only in environment.yml {sorted(listed - {_normalise(r) for r in project['dependencies']})}, "
        f"only in pyproject.toml {sorted({_normalise(r) for r in project['dependencies']} - listed)}")
    assert "-e ." in pip_section, "environment.yml must install the package itself"
