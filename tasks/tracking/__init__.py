"""MLflow glue, one module per concern. Importing the package imports nothing else:

- :mod:`tasks.tracking.client`: where runs go (:func:`~tasks.tracking.client.resolve_tracking_uri`)
  and the one way to reach MLflow: an ``MlflowClient`` bound to that URI
  (:func:`~tasks.tracking.client.connect`), with batched logging. Nothing here sets MLflow's
  global tracking URI or relies on an "active run".
- :mod:`tasks.tracking.gitinfo`: the commit, dirty flag and branch a run records.
- :mod:`tasks.tracking.values`: params flattened for MLflow, their hash, finite metric values.
- :mod:`tasks.tracking.dvc_hash`: the md5 DVC records for an output (DVC's own hashing).
- :mod:`tasks.tracking.stage_run`: a stage's run and its logging handle (``StageTracker``).
- :mod:`tasks.tracking.outage`: every logging call through a ``RunSink``, kept on disk while the
  server is down and sent later by ``rlhf sync``.
- :mod:`tasks.tracking.lifecycle`: runs created tagged with their owner process; a later run
  closes the ones whose process was killed.

The pipeline's parent run (opened and summarised by the flow) is :mod:`tasks.parent_run`; the
model registry is :mod:`tasks.registry`.
"""
