"""One module per ``stages`` command: ``configure(parser)`` and ``run(args) -> int``."""
