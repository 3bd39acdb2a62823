"""Benchmarks: timed runs side by side (``runner``), the results' tables and plots
(``report``), drafters that know the answer (``drafters``, also used by the tests) and
the official backend's row (``official``). ``python -m mlx_blockpilot.bench`` runs it."""
