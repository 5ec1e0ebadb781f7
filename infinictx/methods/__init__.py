"""Methods: each turns a loaded model into a session. One file per method, its config a dataclass."""

from .temp_lora import TempLoraConfig, TempLoraSession
from .window import WindowConfig

METHODS = {"window": WindowConfig, "temp-lora": TempLoraConfig}

__all__ = ["METHODS", "TempLoraConfig", "TempLoraSession", "WindowConfig"]
