"""Pipeline stages: one module per DVC stage plus shared glue (params, tracking, validation)."""
