"""The chat worker's settings: the runtime's, the client keys, its two models and the generation loop's knobs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.declare import var
from common.parsers import boolean, integer, number, path
from common.settings import ChatModels, ClientKeys, Device, Settings


@dataclass(frozen=True)
class ChatSettings(Settings, Device, ClientKeys, ChatModels):
    """Chat worker"""

    qwen_base_preload: bool = var("QWEN_BASE_PRELOAD", boolean(), False,
                                  "load the base model at start instead of on first use")
    chat_max_batch: int = var("CHAT_MAX_BATCH", integer(1, 256), 16, "most sequences decoded together")
    chat_max_context_tokens: int = var("CHAT_MAX_CONTEXT_TOKENS", integer(64, 1_048_576), 8192,
                                       "context limit (also capped by the model's); older turns are cut first")
    chat_request_timeout_seconds: float = var(
        "CHAT_REQUEST_TIMEOUT_SECONDS", number(1, 3600), 60.0,
        "server-side deadline of a non-streaming HTTP request (504 after; under RunPod's 100 s proxy limit); a "
        "stream ends when no token came for this long. Queue jobs use the runner's deadline instead")
    chat_max_waiting: int = var(
        "CHAT_MAX_WAITING", integer(0, 100_000), 8,
        "HTTP requests waiting for a decode row (beyond the rows free) before more are refused at once with 503 + "
        "`Retry-After` (queue jobs are never refused). Shedding needs the chat worker's `--threads` (32) above "
        "`CHAT_MAX_BATCH` + this: the app runs at most `--threads` requests, the rest wait in the server")
    chat_reload_wait_seconds: float = var(
        "CHAT_RELOAD_WAIT_SECONDS", number(0, 600), 30.0,
        "after an eviction, how long a request waits for the GPU lock to reload the model (503 + `Retry-After` after)")
    chat_sfw_words_path: Path | None = var("CHAT_SFW_WORDS_PATH", path(), None, "whole-word list for `sfw_mode`",
                                           shown="`workers/chat/sfw_words.txt`")
    chat_enhance_template_path: Path | None = var("CHAT_ENHANCE_TEMPLATE_PATH", path(), None,
                                                  "system instruction of `/enhance`",
                                                  shown="`workers/chat/enhance_system.txt`")
    chat_prefix_cache_tokens: int = var(
        "CHAT_PREFIX_CACHE_TOKENS", integer(0, 1_048_576), 32768,
        "tokens of recent sequences' KV kept per model (blocks of 16, least recently used evicted) so a prompt that "
        "resends a conversation prefills only its new turn; on the slot cache only; 0: off. Qwen2.5-7B: 57 KB a "
        "token, 1.9 GB at the default, reserved with the model")
    chat_decode_ahead: bool = var(
        "CHAT_DECODE_AHEAD", boolean(), False,
        "launch each decode step before the host has read the previous step's tokens, so streaming and admission "
        "overlap the GPU's work (same math; a step launched ahead is dropped when rows join or leave). Off until "
        "measured on a GPU: `python -m bench chat` compares it on and off")
    chat_prefill_chunk_tokens: int = var(
        "CHAT_PREFILL_CHUNK_TOKENS", integer(0, 1_048_576), 2048,
        "a prompt with more tokens than this to prefill, arriving while other streams decode, is prefilled this "
        "many tokens per decode step so the running streams keep decoding (chunked prefill); 0: all at once")
    chat_static_cache: bool = var("CHAT_STATIC_CACHE", boolean(), True,
                                  "decode on a preallocated slot KV cache (off: the DynamicCache path)")
    chat_cuda_graphs: bool = var("CHAT_CUDA_GRAPHS", boolean(), True,
                                 "capture the decode step as CUDA graphs per batch bucket (CUDA only; falls back to "
                                 "eager)")
    chat_compile_decode: bool = var(
        "CHAT_COMPILE_DECODE", boolean(), False,
        "`torch.compile` the lean decode step (Qwen2/Llama) before graph capture: one compile per batch/span bucket, "
        "about a minute each at start")
    chat_fp8: bool = var(
        "CHAT_FP8", boolean(), False,
        "the decoder layers' linear weights in FP8 (torchao, row-wise scales, activations quantised per token): half "
        "the bytes a decode step reads; changes the math, so off by default; fastest with `CHAT_COMPILE_DECODE`. "
        "Needs CUDA capability 8.9 or newer and torchao, else the worker refuses to start")
