#!/usr/bin/env bash
# The release artefacts as a user gets them, checked before anyone publishes them:
#   1. `python -m build`: wheel and sdist, from a clean copy of the tracked files;
#   2. `twine check --strict`: the metadata and the README render on an index page;
#   3. the wheel's and the sdist's file lists: exactly the package (nothing from tests/,
#      benchmarks/, dags_examples/, no bytecode), the licence, and the metadata we promise
#      (SPDX licence, classifiers, project URLs, no test tooling among the runtime dependencies,
#      no auto-loaded pytest plugin, absolute image links in the long description);
#   4. the wheel (not the checkout) installed into a fresh virtualenv with Airflow 3.3's
#      constraints: import, `airflow providers list` shows it, the connection type `mews` is
#      registered, `mews-sandbox` starts.
# Artefacts: dist/ (removed and rebuilt each run). Env: PYTHON (interpreter), PIP_CACHE_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mews-package-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
quiet_pip() { "$@" 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'; }

echo "== package: tools (build, twine) in their own virtualenv"
"$PY" -m venv "$WORK/tools"
quiet_pip "$WORK/tools/bin/pip" install --quiet --upgrade pip
quiet_pip "$WORK/tools/bin/pip" install --quiet "build>=1.2" "twine>=6.1"

echo "== package: python -m build (from the tracked files only)"
# A clean copy of what git tracks: no stray egg-info, caches or local venvs leak into the sdist.
mkdir "$WORK/src"
git ls-files -z | xargs -0 cp --parents -t "$WORK/src"
rm -rf dist
quiet_pip "$WORK/tools/bin/python" -m build --outdir "$ROOT/dist" "$WORK/src" >"$WORK/build.log" ||
  { tail -40 "$WORK/build.log"; exit 1; }
ls -l dist

echo "== package: twine check --strict"
"$WORK/tools/bin/twine" check --strict dist/*

echo "== package: file lists and metadata"
git ls-files airflow_provider_mews >"$WORK/tracked.txt"
"$WORK/tools/bin/python" - "$WORK/tracked.txt" dist <<'PYTHON'
"""Fails on any unexpected, missing or wrong file or metadata in the wheel and the sdist."""

import re
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

tracked = {p for p in Path(sys.argv[1]).read_text().split() if not p.endswith("/")}
dist = Path(sys.argv[2])
(wheel,) = dist.glob("*.whl")
(sdist,) = dist.glob("*.tar.gz")
problems: list[str] = []

package = {p for p in tracked if p.endswith((".py", "py.typed", ".json", ".yaml"))}
with zipfile.ZipFile(wheel) as zf:
    names = set(zf.namelist())
    (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    metadata = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
    entry_points = zf.read(f"{info}/entry_points.txt").decode()
dist_info = {f"{info}/{n}" for n in ("METADATA", "WHEEL", "RECORD", "entry_points.txt", "top_level.txt")}
dist_info.add(f"{info}/licenses/LICENSE")
print(f"{wheel.name}: {len(names)} files")
for name in sorted(names):
    print(f"  {name}")
unexpected = names - package - dist_info
missing = (package | dist_info) - names
if unexpected:
    problems.append(f"the wheel holds unexpected files: {sorted(unexpected)}")
if missing:
    problems.append(f"the wheel lacks: {sorted(missing)}")

with tarfile.open(sdist) as tf:
    members = {m.name.split("/", 1)[1] for m in tf.getmembers() if m.isfile()}
top = {"PKG-INFO", "pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "MANIFEST.in", "setup.cfg"}
egg_info = {m for m in members if m.startswith("airflow_provider_mews.egg-info/")}
print(f"{sdist.name}: {len(members)} files (package, {sorted(top)}, egg-info)")
unexpected = members - package - top - egg_info
if unexpected:
    problems.append(f"the sdist holds unexpected files (tests belong in the repository): {sorted(unexpected)}")
if (package | top) - members:
    problems.append(f"the sdist lacks: {sorted((package | top) - members)}")

classifiers = metadata.get_all("Classifier") or []
requires = metadata.get_all("Requires-Dist") or []
urls = metadata.get_all("Project-URL") or []
runtime = [r for r in requires if "extra ==" not in r]
checks = {
    "License-Expression: Apache-2.0": metadata.get("License-Expression") == "Apache-2.0",
    "License-File: LICENSE": "LICENSE" in (metadata.get_all("License-File") or []),
    "Framework :: Apache Airflow": "Framework :: Apache Airflow" in classifiers,
    "Framework :: Apache Airflow :: Provider": "Framework :: Apache Airflow :: Provider" in classifiers,
    "Project-URLs Homepage, Source, Issues, Changelog": {"Homepage", "Source", "Issues", "Changelog"}
    <= {u.split(",")[0].strip() for u in urls},
    "no test or demo tooling at run time": not [
        r for r in runtime if re.match(r"(pytest|hypothesis|playwright|apache-airflow-providers-sqlite)", r)
    ],
    "the sqlite provider in the demo extra": any("sqlite" in r and "extra == \"demo\"" in r for r in requires),
    "no auto-loaded pytest plugin (pytest11)": "pytest11" not in entry_points,
    "the Airflow provider entry point": "apache_airflow_provider" in entry_points,
    "README images with absolute links": not re.search(r"!\[[^\]]*\]\((?!https://)", metadata.get_payload()),
}
for what, ok in checks.items():
    print(f"  {'ok' if ok else 'FAILED'}: {what}")
    if not ok:
        problems.append(what)
print(f"  runtime dependencies: {runtime}")
if problems:
    print("package: FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(1)
PYTHON

echo "== package: the wheel installed into a fresh virtualenv (Airflow 3.3 constraints)"
"$PY" -m venv "$WORK/venv"
quiet_pip "$WORK/venv/bin/pip" install --quiet --upgrade pip
quiet_pip "$WORK/venv/bin/pip" install --quiet dist/*.whl -c constraints/airflow-3.3.txt
"$WORK/venv/bin/pip" check
cd "$WORK"  # away from the checkout: only the installed wheel can be imported
export AIRFLOW_HOME="$WORK/airflow" AIRFLOW__CORE__LOAD_EXAMPLES=False
"$WORK/venv/bin/python" - <<'PYTHON'
import airflow_provider_mews
from airflow_provider_mews.hooks.mews import MewsConnectorHook
from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

assert "site-packages" in airflow_provider_mews.__file__, airflow_provider_mews.__file__
print(f"ok: import airflow_provider_mews {airflow_provider_mews.__version__} from {airflow_provider_mews.__file__}")
print(f"ok: {MewsConnectorHook.__name__}, {LoyaltyMembershipAddOperator.__name__}")
PYTHON
"$WORK/venv/bin/airflow" providers list -o plain >"$WORK/providers.txt" 2>"$WORK/providers.err" ||
  { cat "$WORK/providers.err"; exit 1; }
grep -q "^airflow-provider-mews" "$WORK/providers.txt" ||
  { cat "$WORK/providers.txt"; echo "package: airflow providers list does not show airflow-provider-mews" >&2; exit 1; }
echo "ok: airflow providers list: $(grep '^airflow-provider-mews' "$WORK/providers.txt" | tr -s ' \t' ' ')"
"$WORK/venv/bin/python" - <<'PYTHON'
from airflow.providers_manager import ProvidersManager

manager = ProvidersManager()
hook = manager.hooks.get("mews")
assert hook is not None and hook.hook_class_name.endswith("MewsConnectorHook"), hook
assert hook.connection_testable, "the mews connection type is not testable"
print(f"ok: connection type mews -> {hook.hook_class_name} ({hook.hook_name}), testable")
PYTHON
timeout 20 "$WORK/venv/bin/mews-sandbox" --help | grep -q "default 8780" ||
  { echo "package: mews-sandbox --help does not show the default port 8780" >&2; exit 1; }
echo "ok: mews-sandbox installed (default port 8780)"
echo "== package: all checks passed"
