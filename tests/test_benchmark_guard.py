"""The in-Airflow CPU regression guard (``benchmarks.in_airflow.guard``) says FAIL when it should.

The benchmark itself runs Airflow for minutes (``python -m benchmarks.run --sections in_airflow``);
here its verdict is checked on measured figures: within the bounds a PASS at any load, beyond them
a FAIL (exit 1) on a quiet machine, and UNMEASURED (exit 3, not a pass) on a loaded one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's benchmarks package

from benchmarks.in_airflow import GUARD_EXIT, GUARD_GROWTH, GUARD_US_PER_ROW, guard


def measured(per_row: dict[int, float], load: float = 0.5) -> dict[str, Any]:
    return {
        "sizes": {
            str(rows): {"task_us_per_row_min": us, "runs": [{"load_average": [load, load, load]}]}
            for rows, us in per_row.items()
        }
    }


def test_the_figures_measured_so_far_pass():
    status, lines = guard(measured({100_000: 10.9, 1_000_000: 9.5, 10_000_000: 10.1}))
    assert status == "PASS" and GUARD_EXIT[status] == 0
    assert lines[-1].startswith("PASS")


@pytest.mark.parametrize(
    ("per_row", "what"),
    [
        ({100_000: 10.0, 1_000_000: 10.5, 10_000_000: GUARD_US_PER_ROW + 0.5}, "> 12"),
        ({100_000: 9.0, 1_000_000: 9.5, 10_000_000: 9.0 * (1 + GUARD_GROWTH) + 0.1}, "grew"),
    ],
    ids=["over the bound", "growing with the rows"],
)
def test_a_regression_fails_loudly_on_a_quiet_machine_and_is_unmeasured_on_a_loaded_one(
    per_row: dict[int, float], what: str
):
    status, lines = guard(measured(per_row))
    assert status == "FAIL" and GUARD_EXIT[status] == 1
    assert lines[-1].startswith("FAIL: in-Airflow CPU per row regressed") and what in lines[-1]
    status, lines = guard(measured(per_row, load=8.0))
    assert status == "UNMEASURED" and GUARD_EXIT[status] == 3
    assert "run again on a quiet machine" in lines[-1]
