"""Prefect flows and the ``rlhf`` command line: the top layer, wiring ``tasks`` together."""
