"""The command-line layer: one module per command (``main(argv) -> exit code``), the
shared flags and error epilogue in ``common``, and the ``mlx-blockpilot`` dispatcher in
``main``. Nothing below this package parses arguments or prints."""
