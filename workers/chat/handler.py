"""The chat worker's handler: models + engine + service, chat-queue jobs (``Handler``), memory control and
status (``ModelControl``). Its HTTP routes are declared apart (api.py), on the same ``ChatService``.

A chat job waits for its generation as long as the runner lets it: ``progress`` is called every wait slice
and raises ``JobCancelled`` at the job's deadline (or when the app cancelled it); the engine request is then
cancelled and the exception propagates. Jobs are never shed: they already waited in the queue.
"""
from __future__ import annotations

from typing import Any

from common.settings import Settings
from workers.core.errors import FatalWorkerError, InvalidJob
from workers.core.handler import Progress, Result
from workers.core.job import Job, JobType, Queue

from . import memory
from .engine import Engine
from .models import ModelName, ModelStore, ModelUnavailable, model_dtype
from .request import Fields, chat_request
from .residency import LazyLoads
from .sampling import MAX_NEW_TOKENS
from .service import ChatService, Patience, Reply

WHICH = {"instruct": (ModelName.INSTRUCT,), "base": (ModelName.BASE,), "all": tuple(ModelName),
         "qwen_instruct": (ModelName.INSTRUCT,), "qwen_base": (ModelName.BASE,)}
CAPABILITIES = ["chat", "chat_unrestricted", "enhance", "generate", "openai_chat_completions", "streaming",
                "continuous_batching", "presence_penalty", "frequency_penalty", "seed", "sfw_filter",
                "context_truncation"]
ENDPOINTS = ["POST /chat", "POST /chat/unrestricted", "POST /enhance", "POST /generate", "GET /enhancement/info",
             "GET /worker/info", "GET /debug/model", "POST /v1/chat/completions", "GET /v1/models",
             "GET /health", "GET /metrics", "GET /memory/status", "POST /memory/load", "POST /memory/unload"]


class ChatHandler:
    queue = Queue.CHAT
    kind = "chat"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = ModelStore(settings)
        self.engine = Engine(self.store, max_batch=settings.chat_max_batch, static_cache=settings.chat_static_cache,
                             cuda_graphs=settings.chat_cuda_graphs, compile_decode=settings.chat_compile_decode,
                             max_waiting=settings.chat_max_waiting,
                             prefix_cache_tokens=settings.chat_prefix_cache_tokens,
                             decode_ahead=settings.chat_decode_ahead,
                             prefill_chunk=settings.chat_prefill_chunk_tokens)
        self.lazy = LazyLoads(self.store, self.reservation_gb)
        self.chat = ChatService(settings, self.store, self.engine, load_lazily=self.lazy.load)

    # ---------------------------------------------------------------- lifecycle
    def setup(self) -> None:
        instruct, base = (self.store.configured(name) for name in ModelName)
        if not (instruct or base):
            raise FatalWorkerError("QWEN_INSTRUCT_PATH is not set (and no QWEN_BASE_PATH either)")
        self.engine.start()
        try:
            if instruct:
                self.store.load(ModelName.INSTRUCT)
            if base and (self.settings.qwen_base_preload or not instruct):
                self.store.load(ModelName.BASE)
        except ModelUnavailable as exc:
            raise FatalWorkerError(exc.message) from exc
        for name in ModelName:
            if self.store.get(name) is not None:
                self.engine.prepare(name)   # slot cache + CUDA-graph capture now, not at the first request

    def close(self) -> None:
        self.engine.stop()

    def collectors(self) -> list:
        """The engine's Prometheus metrics, for the worker's registry (``Metrics.include``)."""
        return self.engine.metrics.collectors()

    # ---------------------------------------------------------------- chat_queue
    def run(self, job: Job, progress: Progress) -> Result:
        if job.queue is not Queue.CHAT:
            raise InvalidJob(f"job type {job.type.value} does not belong to chat_queue")
        fields = job_fields(job)
        progress(0.0, "generating")
        patience = Patience(timeout=None, check=lambda: progress(0.0, "generating"), shed=False)
        if job.type is JobType.CHAT_ENHANCE:
            enhancement = self.chat.enhance(fields, patience)
            return Result(outputs=[], metadata={**job_metadata(enhancement.reply), **enhancement.fields()})
        unrestricted = job.type is JobType.CHAT_UNRESTRICTED
        reply = self.chat.reply(chat_request(fields), patience, unrestricted=unrestricted)
        metadata = job_metadata(reply)
        if unrestricted:
            metadata["unrestricted_mode"] = True
        return Result(outputs=[], metadata=metadata)

    # ---------------------------------------------------------------- memory control
    def default_models(self) -> str:
        """The ``which`` of the models ``setup`` loads: what an evicted chat reloads on demand."""
        instruct, base = (self.store.configured(name) for name in ModelName)
        if instruct and base and self.settings.qwen_base_preload:
            return "all"
        return "instruct" if instruct else "base"

    def load(self, which: str) -> str:
        done = []
        for name in _which(which):
            if not self.store.configured(name):
                done.append(f"{name.value} is not configured")
                continue
            self.store.load(name)   # ModelUnavailable: a WorkerError, 503 on /memory/load
            self.engine.prepare(name)
            done.append(f"{name.value} loaded")
        return "; ".join(done)

    def unload(self, which: str) -> str:
        done = []
        for name in _which(which):
            unloaded = self.engine.unload(name)
            self.lazy.unloaded(name)
            done.append(f"{name.value} {'unloaded' if unloaded else 'was not loaded'}")
        return "; ".join(done)

    def reservation_gb(self, name: ModelName) -> float:
        """What ``name`` needs reserved while served here: weights + its slot KV cache + a prefill (memory.py)."""
        path = self.store.path(name)
        if path is None:
            raise ModelUnavailable(f"{name.value} is not configured on this worker")
        return memory.reservation_gb(path, model_dtype(self.store.device), self.engine.max_batch,
                                     self.store.max_context, self.engine.max_prefill_tokens,
                                     self.engine.prefix_cache_tokens)

    # ---------------------------------------------------------------- status
    def models_available(self) -> dict[str, dict[str, bool]]:
        return {name.value: {"configured": self.store.configured(name), "loaded": self.store.get(name) is not None}
                for name in ModelName}

    def status(self, detail: bool = False) -> dict[str, Any]:
        models = {name.value: self.store.describe(name) if detail else {
            "configured": self.store.configured(name), "loaded": self.store.get(name) is not None}
            for name in ModelName}
        return {"kind": self.kind, "queue": self.queue.value, "device": self.store.device.type,
                "ready": self.engine.running and any(m["loaded"] for m in models.values()),
                "models": models, "loaded_models": [n for n, m in models.items() if m["loaded"]],
                "engine": self.engine.stats(), "capabilities": CAPABILITIES, "endpoints": ENDPOINTS,
                "limits": {"max_tokens": MAX_NEW_TOKENS, "max_context_tokens": self.store.max_context,
                           "max_batch": self.engine.max_batch}}


def job_fields(job: Job) -> Fields:
    """The request fields of a chat job: ``config`` first, then top-level keys; a bare ``prompt`` becomes the
    user message when there are no ``messages``."""
    body = {k: v for k, v in job.top.items() if k not in ("config", "metadata")}
    body.update(job.config)
    if body.get("messages") is None and isinstance(body.get("prompt"), str) and body["prompt"].strip():
        body["messages"] = [{"role": "user", "content": body["prompt"]}]
    return Fields(body, lambda key: f"config.{key}" if key in job.config else key)


def job_metadata(reply: Reply) -> dict[str, Any]:
    info = reply.model_info()
    return {"response": reply.text, "generation_time": round(reply.seconds, 3),
            "tokens_generated": len(reply.generation.token_ids), "model_used": info["model"],
            "finish_reason": info["finish_reason"], "prompt_tokens": info["prompt_tokens"],
            "context_truncated": info["context_truncated"]}


def _which(which: str) -> tuple[ModelName, ...]:
    names = WHICH.get(which.strip().lower()) if isinstance(which, str) else None
    if names is None:
        raise InvalidJob("which must be instruct, base or all")
    return names
