"""What the package promises its users, checked from the checkout (``.ci/package.sh`` checks the
built wheel and sdist): one version everywhere, test tooling only where asked for."""

from __future__ import annotations

import re

import tomllib
from conftest import ROOT

import airflow_provider_mews
from airflow_provider_mews.get_provider_info import get_provider_info

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_is_single_sourced():
    version = airflow_provider_mews.__version__
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "airflow_provider_mews.__version__"
    }
    assert get_provider_info()["versions"] == [version]
    top = re.search(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert top and top.group(1) == version, "CHANGELOG.md's top entry must name __version__"


def test_runtime_dependencies_hold_no_test_or_demo_tooling():
    runtime = " ".join(PYPROJECT["project"]["dependencies"])
    for tool in ("pytest", "hypothesis", "playwright", "providers-sqlite", "openlineage"):
        assert tool not in runtime
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any("providers-sqlite" in d for d in extras["demo"])
    assert any("providers-openlineage" in d for d in extras["dev"])


def test_the_pytest_plugin_is_opt_in():
    assert "pytest11" not in PYPROJECT["project"].get("entry-points", {})
    assert "pytest_plugins" in (ROOT / "tests" / "conftest.py").read_text()


def test_the_licence_is_apache_2():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    requires = " ".join(PYPROJECT["build-system"]["requires"])
    assert (
        re.search(r"setuptools>=(\d+)", requires)
        and int(re.search(r"setuptools>=(\d+)", requires).group(1)) >= 77
    )
