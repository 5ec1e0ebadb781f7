"""Methods: each turns a loaded model into a session. One file per method, its config a dataclass."""

from .kv_cache import FullConfig, KVCacheSession, StreamingConfig
from .longcache import LongCacheConfig
from .memory import MemoryConfig, MemorySession
from .razor import RazorConfig
from .temp_lora import TempLoraConfig, TempLoraSession
from .window import WindowConfig

METHODS = {"window": WindowConfig, "temp-lora": TempLoraConfig, "memory": MemoryConfig, "full": FullConfig,
           "streaming": StreamingConfig, "longcache": LongCacheConfig, "razor": RazorConfig}

__all__ = ["METHODS", "FullConfig", "KVCacheSession", "LongCacheConfig", "MemoryConfig", "MemorySession",
           "RazorConfig", "StreamingConfig", "TempLoraConfig", "TempLoraSession", "WindowConfig"]
