"""Methods: each turns a loaded model into a session. One file per method, its config a dataclass."""

from .memory import MemoryConfig, MemorySession
from .temp_lora import TempLoraConfig, TempLoraSession
from .window import WindowConfig

METHODS = {"window": WindowConfig, "temp-lora": TempLoraConfig, "memory": MemoryConfig}

__all__ = ["METHODS", "MemoryConfig", "MemorySession", "TempLoraConfig", "TempLoraSession", "WindowConfig"]
