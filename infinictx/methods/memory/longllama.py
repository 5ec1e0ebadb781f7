"""LongLLaMA (Focused Transformer) checkpoints: Llama weights under the same names, plus config fields that say
which layers read memory and how. `load_model` reads one as a plain Llama model with its memory settings in
`LoadedModel.memory` (the `memory` method takes its defaults from there); CrossBatch fine-tuning saves one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ...core.errors import InfinictxError
from ...core.models import LoadedModel

# the last field is ours, not LongLLaMA's: the memory gate's N the checkpoint reads with (--memory-share-tokens)
LONGLLAMA_FIELDS = ("mem_layers", "last_context_length", "mem_positionals", "mem_dtype", "mem_attention_grouping",
                    "mem_share_tokens")
LONGLLAMA_CODE_FIELDS = ("auto_map", "architectures", "model_type", "torch_attention", "gradient_checkpoint_every_ith")


def longllama_config(raw: dict):
    """Split a LongLLaMA config.json into a plain LlamaConfig and the memory settings infinictx's `memory`
    method reads (mem_positionals true -> memory keys "as if first"; false -> no RoPE in memory layers)."""
    from transformers import LlamaConfig

    raw = dict(raw)
    fields = {k: raw.pop(k) for k in LONGLLAMA_FIELDS if k in raw}
    for k in LONGLLAMA_CODE_FIELDS:
        raw.pop(k, None)
    if raw.get("rope_scaling"):
        raise InfinictxError("LongLLaMA checkpoints with rope_scaling are not supported (LongLLaMA requires none)")
    raw.pop("rope_scaling", None)
    memory = {"mem_layers": list(fields.get("mem_layers") or []),
              "last_context_length": fields.get("last_context_length", 1024),
              "positionals": "first" if fields.get("mem_positionals", True) else "none",
              "mem_dtype": fields.get("mem_dtype", "bfloat16"),
              "grouping": fields.get("mem_attention_grouping"),
              "memory_share_tokens": fields.get("mem_share_tokens")}
    return LlamaConfig(**raw), memory


def is_longllama(raw: dict) -> bool:
    """Whether a config.json (as a dict) is LongLLaMA's."""
    return raw.get("model_type") == "longllama" or "mem_layers" in raw


def save_longllama_checkpoint(lm: LoadedModel, out: Path, mem_layers: list[int], last_context_length: int,
                              extra: dict | None = None, share_tokens: int | None = None):
    """Save the (merged) model as a LongLLaMA-format directory: Llama weights, config.json with LongLLaMA's
    memory fields, the tokenizer. Written to a temporary folder and renamed: complete or absent."""
    from safetensors.torch import save_model

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        config = lm.model.config.to_dict()
        config.update({"architectures": ["LongLlamaForCausalLM"], "model_type": "longllama",
                       "mem_layers": list(mem_layers), "last_context_length": last_context_length,
                       "mem_positionals": True, "mem_dtype": str(lm.dtype).split(".")[-1],
                       "mem_attention_grouping": None})
        if share_tokens:
            config["mem_share_tokens"] = share_tokens
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        lm.tokenizer.save_pretrained(tmp)
        save_model(lm.model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if extra:
            (tmp / "infinictx-training.json").write_text(json.dumps(extra, indent=2, default=str))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
