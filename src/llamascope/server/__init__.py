"""The OpenAI-compatible server: `app.py` (FastAPI app and schemas), `scheduler.py` (continuous batching).

Needs the `server` extra (fastapi, uvicorn); nothing here is imported by the rest of llamascope.
"""

from .app import ServerSettings, create_app, serve

__all__ = ["ServerSettings", "create_app", "serve"]
