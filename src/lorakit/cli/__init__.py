"""The `lorakit` command (`lorakit ...`, `python -m lorakit`, `python -m lorakit.cli`).

`main` defines the app and the training commands, `generate` the generation commands
(generate, chat), `tools` the rest (eval, merge, inspect, serve, data, init).
"""

from lorakit.cli.main import app, main

__all__ = ["app", "main"]
