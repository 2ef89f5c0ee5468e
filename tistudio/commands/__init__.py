"""The headless commands, one module per group.  Each has `add_commands(subparsers)`."""
