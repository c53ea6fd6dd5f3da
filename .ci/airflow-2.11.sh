#!/usr/bin/env bash
# Unit tests and one end-to-end DAG run on Airflow 2.11, in its own virtualenv.
set -euo pipefail
echo "(not yet)"
