"""Training data and training: self-distillation for drafters (``distill``,
``draft_trainer``), block-size sweeps for policies (``sweep``, ``sweep_file``,
``policy_trainer``). The command lines are in ``mlx_blockpilot.cli``."""
