"""The loyalty-membership domain: what the operators do with rows, apart from Airflow and HTTP.

- :mod:`.normalize`: a source row checked and converted into a Mews membership (pure).
- :mod:`.batches` and :mod:`.add_run`: the add path (batches, refusal isolation, the run).
- :mod:`.sync_plan`, :mod:`.sync_batches`, :mod:`.sync_run`, :mod:`.scope`: the sync path
  (matching, diffs, updates, the mirror's removals).
- :mod:`.reconcile`: reading back what Mews stored after an answer was lost.
"""
