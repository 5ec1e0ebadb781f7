"""`infinictx serve`: long-context sessions over HTTP on one loaded model (`app`: routes; `engine`: sessions,
job queue, checkpoints, expiry)."""

from .app import create_app, serve
from .engine import Engine, Jobs, ServeSettings

__all__ = ["Engine", "Jobs", "ServeSettings", "create_app", "serve"]
