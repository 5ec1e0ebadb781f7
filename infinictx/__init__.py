"""infinictx: let a short-window causal LM read, score and write texts far longer than its window.

  core/      the session protocol, the layer-by-layer forward, models, the method registry, cost
  methods/   one file or subpackage per method (window, memory, KV-cache policies), registered by name
  learners/  what learns while a session reads (Temp-Lora), attachable to any method
  training/  Mini-Sequence training, LoRA set-up
  tasks/     perplexity, generation, retrieval: the harness, blind to the method
  analysis/  the retrieval-head probe
  data/      texts and the PyPI fetcher
  runs.py    RunSpec -> Result, the one layer under every front
  fronts/    the command line"""

from . import methods  # registers every method  # noqa: F401
from .core.errors import InfinictxError
from .core.models import LoadedModel, load_model, weights_fingerprint
from .core.registry import METHODS, method_config, register_method, setting, settings_of
from .core.session import Capabilities, Sampler, Session
from .data.texts import read_text
from .learners import TempLora, TempLoraConfig
from .methods import FullConfig, LongCacheConfig, MemoryConfig, MethodConfig, RazorConfig, StreamingConfig, WindowConfig
from .runs import RunSpec, make_spec, run
from .tasks import (
           GenerationResult,
           PerplexityResult,
           RetrievalResult,
           generate_long,
           run_retrieval,
           streaming_perplexity,
)

__version__ = "0.1.0"
__all__ = ["Capabilities", "FullConfig", "GenerationResult", "InfinictxError", "LoadedModel", "LongCacheConfig",
           "METHODS", "MemoryConfig", "MethodConfig", "PerplexityResult", "RazorConfig", "RetrievalResult", "RunSpec",
           "Sampler", "Session", "StreamingConfig", "TempLora", "TempLoraConfig", "WindowConfig", "generate_long",
           "load_model", "make_spec", "method_config", "read_text", "register_method", "run", "run_retrieval",
           "setting", "settings_of", "streaming_perplexity", "weights_fingerprint"]
