"""Serving: an OpenAI-compatible server for one base model and many LoRA adapters.

FastAPI and uvicorn (the `serve` extra) are imported only when the app is built, so
`import lorakit.serve` works without them.
"""

from lorakit.serve.main import build_state, check_bind, serve_main

__all__ = ["build_state", "check_bind", "serve_main"]
