"""What the HTTP routes and the queue jobs call: pick a model, build the prompt, generate, filter.

``enhance(fields, patience)`` is the prompt rewrite of both ``POST /enhance`` and the ``chat_enhance`` job: one
parse, one generation, one clean-up of the answer; the route and the job only shape what it returns.

``reply(request, patience)`` waits for the whole answer, as ``patience`` says: an HTTP request until
``CHAT_REQUEST_TIMEOUT_SECONDS`` or until its client disconnects, refused at once when the waiting line is
full; a queue job for as long as the runner's ``progress`` lets it (its deadline). ``stream(request)``
resolves and submits at once (so a bad request or a missing model fails before anything is sent) and returns
an iterator of text deltas that ends with the ``Reply``; it ends with a timeout when no token came for
``CHAT_REQUEST_TIMEOUT_SECONDS``, and is cancelled when a write to its client fails or, while it waits for
tokens (in the waiting line, in a long prefill), when its ``check`` says the client went away.
"""
from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.settings import Settings
from workers.core.errors import ErrorType, InvalidJob, RetryableError

from .detokenize import IncrementalDecoder
from .engine import WAIT_SLICE_SECONDS, Engine
from .generation import Generation, GenerationRequest
from .models import LoadedModel, ModelName, ModelStore, ModelUnavailable
from .prompt import Prompt, chat_prompt, prompt_budget, text_prompt
from .request import ChatRequest, Fields, enhance_request
from .sfw import WordFilter

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = Path(__file__).with_name("enhance_system.txt")


@dataclass(frozen=True)
class Patience:
    """How a caller waits for its generation (``Engine.run``'s ``timeout``, ``check`` and ``shed``)."""

    timeout: float | None                    # its own deadline; None: none (a job: the runner's deadline rules)
    check: Callable[[], None] | None = None  # run every wait slice; raises to give up (client gone, job cancelled)
    shed: bool = True                        # refused at once (503 + Retry-After) when the waiting line is full


@dataclass(frozen=True)
class Reply:
    text: str
    generation: Generation
    prompt: Prompt
    loaded: LoadedModel
    requested: ModelName
    filtered: int | None       # words masked by sfw_mode; None when it was off
    seconds: float

    def model_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "model": self.loaded.name.value, "requested_model": self.requested.value,
            "fallback": self.loaded.name is not self.requested, "device": self.loaded.device.type,
            "dtype": str(self.loaded.dtype).removeprefix("torch."), "prompt_tokens": self.generation.prompt_tokens,
            "max_context_tokens": self.loaded.max_context, "context_truncated": self.prompt.truncated,
            "dropped_messages": self.prompt.dropped_messages, "finish_reason": self.generation.finish_reason,
            "queue_seconds": round(self.generation.queued_seconds, 3)}
        if self.filtered is not None:
            info["sfw_filtered_words"] = self.filtered
        return info


@dataclass(frozen=True)
class Enhancement:
    reply: Reply
    original: str    # the prompt as given (the last user message)
    rewrite: str     # the model's rewrite without quotes or a label; "" when it gave nothing usable

    @property
    def prompt(self) -> str:
        """The prompt to use: the rewrite, else the original (an empty rewrite never blanks a prompt)."""
        return self.rewrite or self.original

    def fields(self) -> dict[str, Any]:
        """The enhancement's part of an answer, the same for the route and the job (CONTRACT §5, §4)."""
        return {"enhanced_prompt": self.prompt, "original_prompt": self.original,
                "enhancement_source": self.reply.loaded.name.value}


def enhanced_text(text: str) -> str:
    """The model's rewrite without surrounding quotes or a leading label."""
    text = text.strip()
    for label in ("Enhanced prompt:", "Prompt:"):
        if text.lower().startswith(label.lower()):
            text = text[len(label):].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def load_instruction(path: Path | None) -> str:
    try:
        text = (path or DEFAULT_INSTRUCTION).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise ConfigError("CHAT_ENHANCE_TEMPLATE_PATH cannot be read as a UTF-8 text file") from None
    if not text:
        raise ConfigError("CHAT_ENHANCE_TEMPLATE_PATH is empty")
    return text


class ChatService:
    def __init__(self, settings: Settings, store: ModelStore, engine: Engine,
                 load_lazily: Callable[[ModelName], LoadedModel] | None = None):
        self.store = store
        self.engine = engine
        self.load_lazily = load_lazily or store.load   # the base model's first-use load (the handler reserves)
        self.timeout = settings.chat_request_timeout_seconds
        self.words = WordFilter.from_file(settings.chat_sfw_words_path)
        self.instruction = load_instruction(settings.chat_enhance_template_path)

    def resolve(self, requested: ModelName) -> LoadedModel:
        """The requested model; the base model loads on first use (``load_lazily``); else the other loaded model
        (reported as a fallback in model_info); else ``ModelUnavailable``."""
        loaded = self.store.get(requested)
        if loaded is None and requested is ModelName.BASE and self.store.configured(requested) \
                and not self.store.failed(requested):
            try:
                loaded = self.load_lazily(requested)
            except ModelUnavailable as exc:
                log.warning("%s not loaded on demand (%s); falling back", requested.value, exc.message)
                loaded = None
        loaded = loaded or self.store.get(requested.other)
        if loaded is None:
            raise ModelUnavailable("no chat model is loaded that can serve this request")
        return loaded

    def http_patience(self, check: Callable[[], None] | None, elapsed: float = 0.0) -> Patience:
        """An HTTP request's: what is left of the server-side deadline (counted from its arrival: ``elapsed``
        went on reloading an evicted model), its client's disconnect check, shed when full."""
        return Patience(max(0.0, self.timeout - elapsed), check, shed=True)

    def reply(self, request: ChatRequest, patience: Patience, unrestricted: bool = False) -> Reply:
        start = time.monotonic()
        loaded, prompt = self._prepare(request)
        generation = self.engine.run(GenerationRequest(loaded.name, prompt.ids, request.sampling),
                                     patience.timeout, patience.check, patience.shed)
        text = loaded.decode(generation.token_ids)
        if request.text is None:
            text = text.strip()
        filtered = None
        if request.sfw_mode and not unrestricted:
            text, filtered = self.words.apply(text)
        return Reply(text, generation, prompt, loaded, request.model, filtered, time.monotonic() - start)

    def enhance(self, fields: Fields, patience: Patience) -> Enhancement:
        """Rewrite a prompt under the configured instruction (unless the body brings its own system message)."""
        request, original = enhance_request(fields, self.instruction)
        reply = self.reply(request, patience)
        return Enhancement(reply, original, enhanced_text(reply.text))

    def stream(self, request: ChatRequest, check: Callable[[], None] | None = None) -> Iterator[str | Reply]:
        start = time.monotonic()
        loaded, prompt = self._prepare(request)
        tokens: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()
        job = GenerationRequest(loaded.name, prompt.ids, request.sampling, on_tokens=tokens.put)
        future = self.engine.submit(job, shed=True)
        future.add_done_callback(lambda _: tokens.put(None))
        return self._deltas(request, loaded, prompt, job, tokens, start, check)

    def _deltas(self, request: ChatRequest, loaded: LoadedModel, prompt: Prompt, job: GenerationRequest,
                tokens: queue.SimpleQueue[list[int] | None], start: float,
                check: Callable[[], None] | None) -> Iterator[str | Reply]:
        decoder = IncrementalDecoder(loaded)
        text, sent, filtered = "", 0, 0
        try:
            while (ids := self._next(tokens, check)) is not None:
                text += decoder.push(ids)
                cut = self.words.stream_cut(text, sent) if request.sfw_mode else len(text)
                if cut > sent:
                    piece, masked = self._filter(text[sent:cut], request.sfw_mode)
                    filtered, sent = filtered + masked, cut
                    yield piece
            generation = self.engine.wait(job)
            text += decoder.finish()
            piece, masked = self._filter(text[sent:], request.sfw_mode)
            if piece:
                yield piece
            yield Reply(text, generation, prompt, loaded, request.model,
                        filtered + masked if request.sfw_mode else None, time.monotonic() - start)
        finally:
            job.cancel()

    def _next(self, tokens: queue.SimpleQueue[list[int] | None], check: Callable[[], None] | None) -> list[int] | None:
        """The next tokens of a stream, waited for in the engine's wait slices with ``check`` after each (no write
        tells a gone client apart while no token comes); a stream that goes ``timeout`` seconds without any ends
        with a timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return tokens.get(timeout=max(0.0, min(WAIT_SLICE_SECONDS, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise RetryableError(f"no token was generated within {self.timeout:g} s",
                                         ErrorType.TIMEOUT_ERROR) from None
                if check is not None:
                    check()

    def _filter(self, text: str, sfw_mode: bool) -> tuple[str, int]:
        return self.words.apply(text) if sfw_mode else (text, 0)

    def _prepare(self, request: ChatRequest) -> tuple[LoadedModel, Prompt]:
        loaded = self.resolve(request.model)
        budget = prompt_budget(loaded, request.sampling.max_tokens)
        if request.text is not None:
            prompt = text_prompt(loaded, request.text, budget)
        else:
            prompt = chat_prompt(loaded, request.messages, budget)
        if not prompt.ids:
            raise InvalidJob("the prompt is empty after tokenisation")
        return loaded, prompt
