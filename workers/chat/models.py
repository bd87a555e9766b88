"""The two Qwen models (instruct and base): loading, unloading, and what a loaded model offers.

One copy of each model at most. Loading runs in the caller's thread under a per-model lock (a second caller
waits for the first load instead of starting another); the engine thread reads what is loaded with ``get``.
Tokenizer calls go through ``LoadedModel`` and are serialised by its own small lock (fast tokenizers are not
safe to share between threads), never held across a generation.
"""
from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from common.settings import Settings
from workers.core.errors import ErrorType, WorkerError
from workers.gpu import fp8 as fp8_mod
from workers.gpu.device import resolve_device

log = logging.getLogger(__name__)

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


class ModelName(str, Enum):
    INSTRUCT = "qwen_instruct"
    BASE = "qwen_base"

    @property
    def short(self) -> str:
        """The ``which`` name used by /memory/load and /memory/unload."""
        return self.value.removeprefix("qwen_")

    @property
    def other(self) -> ModelName:
        return ModelName.BASE if self is ModelName.INSTRUCT else ModelName.INSTRUCT


class ModelUnavailable(WorkerError):
    """No model can serve the request (not configured, failed to load, or unloaded)."""

    error_type = ErrorType.WORKER_UNAVAILABLE


@dataclass(eq=False)
class LoadedModel:
    name: ModelName
    model: Any                   # a transformers causal LM, in eval mode
    tokenizer: Any
    device: torch.device
    stop_ids: frozenset[int]
    max_context: int
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        with self.lock:
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def render(self, messages: list[dict[str, str]]) -> str:
        """The chat template applied to ``messages``, ending with the assistant's generation prompt."""
        with self.lock:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def describe(self) -> dict[str, Any]:
        config = self.model.config
        return {
            "loaded": True,
            "architecture": type(self.model).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device.type,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "layers": getattr(config, "num_hidden_layers", None),
            "hidden_size": getattr(config, "hidden_size", None),
            "vocab_size": getattr(config, "vocab_size", None),
            "max_context_tokens": self.max_context,
            "chat_template": self.has_chat_template,
            "fp8_layers": sum(1 for p in self.model.parameters() if fp8_mod.is_float8(p)),
        }


def model_dtype(device: torch.device) -> torch.dtype:
    """What the models are loaded in: bf16 on CUDA, fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(name: ModelName, path: Path, device: torch.device, max_context: int, fp8: bool = False) -> LoadedModel:
    """Load one model folder offline: bf16 on CUDA, fp32 on CPU; with ``fp8`` (CHAT_FP8) its decoder layers'
    linear weights converted to FP8 (``convert_fp8``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    dtype = model_dtype(device)
    kwargs: dict[str, Any] = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, **kwargs)
    model = model.to(device).eval()
    model.requires_grad_(False)
    if fp8:
        convert_fp8(model)
    stop_ids = set(_ids(model.generation_config.eos_token_id)) | set(_ids(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    stop_ids |= {vocab[token] for token in STOP_TOKENS if token in vocab}
    limit = getattr(model.config, "max_position_embeddings", None) or max_context
    return LoadedModel(name, model, tokenizer, device, frozenset(stop_ids), min(limit, max_context))


def fp8_selection(model: Any) -> fp8_mod.Selection:
    """The linear layers CHAT_FP8 converts: those of the decoder layers (attention and MLP projections: 86 % of
    Qwen2.5-7B's weights, 92 % of the bytes a decode step reads). The embedding and ``lm_head`` stay bf16: a
    decode step reads one embedding row, and the logits keep their precision for sampling."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"CHAT_FP8: {type(model).__name__} has no decoder layers (model.model.layers)")
    return fp8_mod.select(model, {type(layer).__name__ for layer in layers})


def convert_fp8(model: Any) -> int:
    """Convert ``fp8_selection(model)`` in place (before the slot batch fuses q/k/v and gate/up: the lean
    decode step fuses the fp8 weights, workers/chat/fused.py); how many layers."""
    selection = fp8_selection(model)
    if not selection.names:
        log.warning("CHAT_FP8: no decoder linear layer of %s can be converted (%d kept, e.g. %s); it stays bf16",
                    type(model).__name__, len(selection.kept), next(iter(selection.kept.values()), "none found"))
    return fp8_mod.quantise(model, selection)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


@dataclass(frozen=True)
class SingleModel:
    """A store of one already-loaded model (what ``Engine`` reads of ``ModelStore``): benchmarks and tests
    drive the engine over a model they built themselves."""

    loaded: LoadedModel

    def get(self, name: ModelName) -> LoadedModel | None:
        return self.loaded if name is self.loaded.name else None

    def unload(self, name: ModelName) -> bool:
        return False


class ModelStore:
    """Which models are configured and loaded. Loading is explicit (``load``); nothing loads by accident."""

    def __init__(self, settings: Settings):
        self.device = resolve_device(settings.device)
        self.fp8 = settings.chat_fp8
        if self.fp8:
            fp8_mod.require(self.device, "CHAT_FP8")
        self.max_context = settings.chat_max_context_tokens
        self._paths = {ModelName.INSTRUCT: settings.qwen_instruct_path, ModelName.BASE: settings.qwen_base_path}
        self._loaded: dict[ModelName, LoadedModel] = {}
        self._locks = {name: threading.Lock() for name in ModelName}
        self._errors: dict[ModelName, str] = {}

    def configured(self, name: ModelName) -> bool:
        return self._paths[name] is not None

    def path(self, name: ModelName) -> Path | None:
        """The model's folder (never shown to clients: it is a filesystem path)."""
        return self._paths[name]

    def failed(self, name: ModelName) -> bool:
        """Whether the last load of this model failed (it is then loaded again only when asked explicitly)."""
        return name in self._errors

    def get(self, name: ModelName) -> LoadedModel | None:
        return self._loaded.get(name)

    def load(self, name: ModelName) -> LoadedModel:
        """The loaded model, loading it first if needed; ``ModelUnavailable`` when it cannot be loaded."""
        with self._locks[name]:
            loaded = self._loaded.get(name)
            if loaded is not None:
                return loaded
            path = self._paths[name]
            if path is None:
                raise ModelUnavailable(f"{name.value} is not configured on this worker")
            log.info("loading %s on %s", name.value, self.device)
            try:
                loaded = load_model(name, path, self.device, self.max_context, fp8=self.fp8)
            except (OSError, ValueError, RuntimeError, ImportError) as exc:
                log.error("loading %s failed: %s", name.value, type(exc).__name__)
                self._errors[name] = f"{type(exc).__name__} while loading"
                raise ModelUnavailable(f"{name.value} could not be loaded", ErrorType.MODEL_LOAD_ERROR) from exc
            self._errors.pop(name, None)
            self._loaded[name] = loaded
            return loaded

    def unload(self, name: ModelName) -> bool:
        """Forget the model; the caller makes sure nothing else holds it. Returns whether it was loaded."""
        with self._locks[name]:
            loaded = self._loaded.pop(name, None)
        if loaded is None:
            return False
        del loaded
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    def describe(self, name: ModelName) -> dict[str, Any]:
        loaded = self._loaded.get(name)
        if loaded is not None:
            return {"configured": True, **loaded.describe()}
        info: dict[str, Any] = {"configured": self.configured(name), "loaded": False}
        if name in self._errors:
            info["last_error"] = self._errors[name]
        return info
