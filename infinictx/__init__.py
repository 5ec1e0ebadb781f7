"""infinictx: let a short-window causal LM read, score and write texts far longer than its window."""

from .errors import InfinictxError
from .evaluate import PerplexityResult, streaming_perplexity
from .generate import GenerationResult, generate_long
from .methods import (METHODS, FullConfig, LongCacheConfig, MemoryConfig, RazorConfig, StreamingConfig, TempLoraConfig,
                      WindowConfig)
from .models import LoadedModel, load_model, weights_fingerprint
from .session import Sampler, Session
from .texts import read_text

__version__ = "0.1.0"
__all__ = ["InfinictxError", "LoadedModel", "METHODS", "FullConfig", "GenerationResult", "LongCacheConfig", "MemoryConfig",
           "PerplexityResult", "RazorConfig", "Sampler", "Session", "StreamingConfig", "TempLoraConfig", "WindowConfig", "generate_long", "load_model", "read_text",
           "streaming_perplexity", "weights_fingerprint"]
