"""Sub-commands of the `dualflow` CLI.

Each module here defines ``HELP: str``, ``add_arguments(parser)`` and ``run(args) -> int``.
The explicit registry is :data:`dualflow.experiments.cli.COMMANDS`.
"""
