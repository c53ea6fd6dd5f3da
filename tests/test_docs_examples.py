"""Every ```python block of README.md and docs/**/*.md runs, so the examples cannot rot.

Each block is compiled and executed in a fresh module namespace (with ``mews_default``
pointing at the sandbox, for examples that read the connection); a block that defines a DAG
is also loaded the way Airflow's DAG processor loads a DAG file (``DagBag``), which must find
its DAGs with their tasks and no import error. Tracebacks name the Markdown file and line.

A block that cannot run on purpose is fenced as ```python no-test (keep them rare: at most
``MAX_NOT_TESTED``).
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_NOT_TESTED = 3
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
DEFINES_DAG = re.compile(r"\bDAG\(|@dag\b")


@dataclass(frozen=True)
class Example:
    path: str  # relative to the repository
    line: int  # of the block's first line of code
    source: str
    tested: bool

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def examples_in(path: Path) -> list[Example]:
    text = path.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        words = match["info"].split()
        if not words or words[0] not in ("python", "py", "{code-block}"):
            continue
        if words[0] == "{code-block}" and words[1:2] != ["python"]:
            continue
        indent = len(match["indent"])
        body = "\n".join(line[indent:] for line in match["body"].splitlines())
        line = text.count("\n", 0, match.start("body")) + 1
        rel = str(path.relative_to(ROOT))
        found.append(Example(rel, line, body, tested="no-test" not in words))
    return found


ALL_EXAMPLES = [example for path in markdown_files() for example in examples_in(path)]
TESTED = [example for example in ALL_EXAMPLES if example.tested]


def run_example(source: str, name: str, line: int, dag_file: Path) -> dict[str, list[str]]:
    """Executes ``source`` in a fresh module; returns ``{dag_id: task_ids}`` of the DAGs it defines,
    as Airflow's DagBag loads them (empty when it defines none). Raises on any error."""
    code = compile("\n" * (line - 1) + source, name, "exec")
    module = types.ModuleType(f"docs_example_{abs(hash((name, line)))}")
    module.__file__ = name
    exec(code, module.__dict__)
    if not DEFINES_DAG.search(source):
        return {}
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.1
        from airflow.models.dagbag import DagBag  # type: ignore[no-redef]
    dag_file.write_text(source, encoding="utf-8")
    bag = DagBag(dag_folder=str(dag_file))
    if bag.import_errors:
        raise AssertionError(f"{name}:{line}: the DAG file does not load: {bag.import_errors}")
    return {dag_id: sorted(dag.task_ids) for dag_id, dag in bag.dags.items()}


def test_the_examples_are_found() -> None:
    """A change to the fences (or to this parser) must not silently leave examples untested."""
    by_file = {p: [e for e in ALL_EXAMPLES if e.path == p] for p in {e.path for e in ALL_EXAMPLES}}
    assert len(by_file.get("README.md", [])) >= 4, (
        "the README's DAGs (add, mirror, names, export) are examples"
    )
    for page in (
        "docs/getting-started.md",
        "docs/howto/add.md",
        "docs/howto/upsert.md",
        "docs/howto/sync.md",
        "docs/howto/names.md",
        "docs/howto/export.md",
    ):
        assert by_file.get(page), f"{page} has no python example"
    not_tested = [e.id for e in ALL_EXAMPLES if not e.tested]
    assert len(not_tested) <= MAX_NOT_TESTED, f"too many examples marked no-test: {not_tested}"


def test_the_readme_is_a_front_door() -> None:
    """The README stays short (issue 20: at most 20 KB); the manual lives in docs/."""
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 20 * 1024, f"README.md is {size} bytes: move detail into a docs/ page and link it"


@pytest.mark.parametrize("example", TESTED, ids=[e.id for e in TESTED])
def test_example_runs(example: Example, mews_conn: str, tmp_path: Path) -> None:
    dags = run_example(example.source, example.path, example.line, tmp_path / "example_dag.py")
    if DEFINES_DAG.search(example.source):
        assert dags, f"{example.id} defines a DAG, but Airflow finds none in it"
        for dag_id, task_ids in dags.items():
            assert task_ids, f"{example.id}: DAG {dag_id} has no task"


def test_a_broken_example_fails(tmp_path: Path) -> None:
    """The runner is not blind: a wrong argument, and a DAG that cannot load, both fail."""
    bad_argument = (
        "from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator\n"
        "LoyaltyMembershipAddOperator(task_id='t', sql_conn_id='w', table='t', batch_size=5000)\n"
    )
    with pytest.raises(ValueError, match="batch_size"):
        run_example(bad_argument, "broken.md", 1, tmp_path / "a.py")
    bad_import = "from airflow.sdk import DAG\nfrom airflow_provider_mews.operators import NoSuchOperator\n"
    with pytest.raises(ImportError):
        run_example(bad_import, "broken.md", 10, tmp_path / "b.py")
