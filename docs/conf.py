"""Sphinx configuration of the documentation site (``make docs``: warnings are errors).

Pages are MyST Markdown (``*.md``); the API reference is autodoc over the installed package.
Autodoc imports the real modules, Airflow included: Airflow reads its configuration when it
is imported, so it gets a throw-away ``AIRFLOW_HOME`` here (nothing is mocked).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_AIRFLOW_HOME = tempfile.mkdtemp(prefix="mews-docs-airflow-")
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")

import airflow_provider_mews  # noqa: E402

project = "airflow-provider-mews"
author = "airflow-provider-mews contributors"
copyright = "airflow-provider-mews contributors, Apache-2.0"
release = airflow_provider_mews.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "img", "Thumbs.db", ".DS_Store"]

# MyST: ```{directive} fences, ::: fences for admonitions, anchors for headings (#section links).
myst_enable_extensions = ["colon_fence", "deflist", "fieldlist"]
myst_heading_anchors = 3

# Autodoc: the docstrings use Sphinx field lists (:param x:); type hints go into the
# description, where an unresolvable annotation (an Airflow internal) stays plain text.
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_class_signature = "separated"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False


# Every cross-reference must resolve (a renamed class breaks the build), except the names no
# inventory can resolve offline: anything outside the package (the standard library, Airflow,
# jinja2: intersphinx would need the network), Airflow's names in string annotations, and the
# package's own names in annotations imported only for type checking.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!airflow_provider_mews\.).+\..+"),
    (r"py:.*", r"Connection|Context|DAG|DagAttributeTypes|XComArg"),
    (r"py:.*", r"Outcome|MewsError|MembershipRun|count"),
]

html_theme = "furo"
html_title = f"airflow-provider-mews {release}"
html_static_path: list[str] = []
