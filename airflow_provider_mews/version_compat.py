"""Every difference between Airflow lines (2.11, 3.0, 3.1, 3.2, 3.3) lives here.

Each name is imported from where it lives today, falling back to where older lines keep it,
feature by feature rather than by version number, as the official providers' ``common.compat``
does. Where each one comes from on each line is checked by ``.ci/airflow-lines.sh``:

==========================  ====================================  =====================================
name                        newest home (from)                    fallback (lines before it)
==========================  ====================================  =====================================
BaseOperator                ``airflow.sdk`` (3.0)                 ``airflow.models`` (2.11)
BaseHook                    ``airflow.sdk`` (3.1)                 ``airflow.hooks.base`` (2.11, 3.0)
Asset                       ``airflow.sdk`` (3.0)                 ``airflow.datasets.Dataset`` (2.11)
AirflowException            ``airflow.sdk.exceptions`` (3.1)      ``airflow.exceptions`` (2.11, 3.0)
AirflowFailException        ``airflow.sdk.exceptions`` (3.2)      ``airflow.exceptions`` (2.11-3.1)
AirflowNotFoundException    ``airflow.sdk.exceptions`` (3.2)      ``airflow.exceptions`` (2.11-3.1)
mask_secret                 ``airflow.sdk.log`` (3.0)             ``airflow.utils.log.secrets_masker``
==========================  ====================================  =====================================

``task_state_store`` (3.3) is read from the task context where it exists (``checkpoint.py``).
"""

from __future__ import annotations


def get_base_airflow_version_tuple() -> tuple[int, int, int]:
    from airflow import __version__
    from packaging.version import Version

    version = Version(__version__)
    return version.major, version.minor, version.micro


AIRFLOW_V_3_0_PLUS = get_base_airflow_version_tuple() >= (3, 0, 0)
AIRFLOW_V_3_1_PLUS = get_base_airflow_version_tuple() >= (3, 1, 0)
AIRFLOW_V_3_2_PLUS = get_base_airflow_version_tuple() >= (3, 2, 0)
AIRFLOW_V_3_3_PLUS = get_base_airflow_version_tuple() >= (3, 3, 0)

try:
    from airflow.sdk import BaseOperator
except ImportError:  # Airflow 2.11
    from airflow.models import BaseOperator  # type: ignore[no-redef,assignment]

try:
    from airflow.sdk import BaseHook
except ImportError:  # Airflow 2.11 and 3.0
    from airflow.hooks.base import BaseHook  # type: ignore[no-redef,attr-defined]

try:
    from airflow.sdk import Asset
except ImportError:  # Airflow 2.11: assets were datasets
    from airflow.datasets import Dataset as Asset  # type: ignore[no-redef]

try:
    from airflow.sdk.exceptions import AirflowException
except ImportError:  # Airflow 2.11 and 3.0
    from airflow.exceptions import AirflowException  # type: ignore[no-redef]

try:
    from airflow.sdk.exceptions import AirflowFailException
except ImportError:  # Airflow 2.11 to 3.1
    from airflow.exceptions import AirflowFailException  # type: ignore[no-redef]

try:  # what ``BaseHook.get_connection`` raises for a conn_id nobody defined
    from airflow.sdk.exceptions import AirflowNotFoundException
except ImportError:  # Airflow 2.11 to 3.1
    from airflow.exceptions import AirflowNotFoundException  # type: ignore[no-redef]

try:
    from airflow.sdk.log import mask_secret
except ImportError:  # Airflow 2.11
    from airflow.utils.log.secrets_masker import mask_secret  # type: ignore[no-redef]

__all__ = [
    "AIRFLOW_V_3_0_PLUS",
    "AIRFLOW_V_3_1_PLUS",
    "AIRFLOW_V_3_2_PLUS",
    "AIRFLOW_V_3_3_PLUS",
    "AirflowException",
    "AirflowFailException",
    "AirflowNotFoundException",
    "Asset",
    "BaseHook",
    "BaseOperator",
    "mask_secret",
]
