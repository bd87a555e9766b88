"""Settings, parsed once at the edge (``Settings.from_env(os.environ)``) into a frozen dataclass.

Library code never reads ``os.environ``. A missing or malformed value raises ``ConfigError`` with one line
naming the variable (never its value). Secrets are wrapped in ``Secret`` so they cannot reach a log or a
``repr`` by accident. Every variable is documented in README.md ("Settings").
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Mapping, TypeVar
from urllib.parse import urlsplit

from common.errors import ConfigError

T = TypeVar("T")


class Secret:
    """A string that never shows itself: ``repr``/``str`` print ``***``; ``reveal()`` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Settings:
    # Supabase: callbacks, storage, registration
    supabase_url: str | None = None
    supabase_service_key: Secret | None = None
    job_callback_secret: Secret | None = None
    storage_bucket: str = "workspace-temp"
    storage_dir: Path | None = None
    # Queues
    redis_url: Secret | None = None
    upstash_url: str | None = None
    upstash_token: Secret | None = None
    queue_pop_side: str = "left"
    poll_min_seconds: float = 0.1
    poll_max_seconds: float = 2.0
    heartbeat_ttl_seconds: int = 30
    max_attempts: int = 3
    redis_timeout_seconds: float = 10.0
    callback_retry_seconds: float = 240.0
    callback_timeout_seconds: float = 15.0
    outbox_interval_seconds: float = 10.0   # OUTBOX_INTERVAL_SECONDS: how often each worker re-sends owed callbacks
    # Worker life cycle (workers/core/service.py)
    cold_stop_settle_seconds: float = 5.0   # WORKER_COLD_STOP_SETTLE_SECONDS: a cold stop waits for a settling job
    job_timeout_grace_seconds: float = 30.0   # JOB_TIMEOUT_GRACE_SECONDS: past the deadline, then the watchdog
    # The job loop (workers/core/runner.py): each job type's deadline, and the circuit breaker
    job_timeout_sdxl_seconds: float = 300.0        # JOB_TIMEOUT_SDXL_SECONDS
    job_timeout_wan_video_seconds: float = 1200.0  # JOB_TIMEOUT_WAN_VIDEO_SECONDS
    job_timeout_wan_image_seconds: float = 300.0   # JOB_TIMEOUT_WAN_IMAGE_SECONDS
    job_timeout_chat_seconds: float = 120.0        # JOB_TIMEOUT_CHAT_SECONDS
    worker_breaker_threshold: int = 5   # infrastructure failures in a row that stop the worker
    # HTTP auth
    wan_worker_api_key: Secret | None = None
    chat_worker_api_key: Secret | None = None
    worker_admin_key: Secret | None = None
    allow_anonymous: bool = False
    # HTTP serving (common/serving.py): a request's line, headers and body must all arrive within this
    http_read_timeout_seconds: float = 10.0
    # Identity and registration
    runpod_pod_id: str | None = None
    public_base_url: str | None = None
    worker_id: str | None = None
    # Reference images
    reference_allow_hosts: frozenset[str] = frozenset()
    reference_failure_policy: str = "fallback"
    reference_max_bytes: int = 20 * 1024 * 1024
    reference_timeout_seconds: float = 15.0
    # Models
    sdxl_model_path: Path | None = None
    sdxl_config_path: Path | None = None
    wan_model_path: Path | None = None
    wan_vace_model_path: Path | None = None
    wan_enhance_template: Path | None = None
    wan_enhance_timeout_seconds: float = 20.0
    wan_batched_cfg: bool = True  # WAN_BATCHED_CFG: cond + uncond in one batch-2 transformer pass
    qwen_instruct_path: Path | None = None
    qwen_base_path: Path | None = None
    chat_worker_url: str = "http://127.0.0.1:7861"
    memory_manager_url: str = "http://127.0.0.1:7870"
    gpu_index: int = 0  # FLEET_GPU_INDEX: the fleet GPU this worker runs on (set by the orchestrator)
    device: str = "auto"
    torch_compile: bool = False
    sdxl_attention: str = "sdpa"
    cuda_graphs: bool = True      # CUDA_GRAPHS: SDXL UNet/text encoders, WAN transformer as CUDA graphs
    compile_blocks: bool = True   # COMPILE_BLOCKS: torch.compile the SDXL/WAN transformer blocks (CUDA only)
    max_prompt_chars: int = 2000
    # Chat worker (workers/chat)
    qwen_base_preload: bool = False
    chat_max_batch: int = 16
    chat_max_context_tokens: int = 8192
    chat_request_timeout_seconds: float = 60.0   # CHAT_REQUEST_TIMEOUT_SECONDS: HTTP deadline (RunPod cuts at 100 s)
    chat_max_waiting: int = 8              # CHAT_MAX_WAITING: requests waiting for a row before HTTP sheds (503)
    chat_reload_wait_seconds: float = 30.0   # CHAT_RELOAD_WAIT_SECONDS: an HTTP request's wait for the GPU lock
    chat_sfw_words_path: Path | None = None
    chat_enhance_template_path: Path | None = None
    chat_static_cache: bool = True   # CHAT_STATIC_CACHE: slot KV cache for decoding (off: the DynamicCache path)
    chat_cuda_graphs: bool = True    # CHAT_CUDA_GRAPHS: CUDA-graph the decode step (only on CUDA, static cache)
    chat_compile_decode: bool = False   # CHAT_COMPILE_DECODE: torch.compile the lean decode step (slow start)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        r = Reader(env)
        settings = cls(
            supabase_url=r.url("SUPABASE_URL"),
            supabase_service_key=r.secret("SUPABASE_SERVICE_KEY") or r.secret("SUPABASE_SERVICE_ROLE_KEY"),
            job_callback_secret=r.secret("JOB_CALLBACK_SECRET"),
            storage_bucket=r.text("STORAGE_BUCKET", "workspace-temp"),
            storage_dir=r.path("STORAGE_DIR"),
            redis_url=r.secret("REDIS_URL"),
            upstash_url=r.url("UPSTASH_REDIS_REST_URL"),
            upstash_token=r.secret("UPSTASH_REDIS_REST_TOKEN"),
            queue_pop_side=r.choice("QUEUE_POP_SIDE", ("left", "right"), "left"),
            poll_min_seconds=r.number("QUEUE_POLL_MIN_SECONDS", 0.1, 0.01, 60),
            poll_max_seconds=r.number("QUEUE_POLL_MAX_SECONDS", 2.0, 0.01, 300),
            heartbeat_ttl_seconds=int(r.number("WORKER_HEARTBEAT_TTL_SECONDS", 30, 2, 3600)),
            max_attempts=int(r.number("JOB_MAX_ATTEMPTS", 3, 1, 100)),
            redis_timeout_seconds=r.number("REDIS_TIMEOUT_SECONDS", 10.0, 0.5, 120),
            callback_retry_seconds=r.number("CALLBACK_RETRY_SECONDS", 240.0, 0, 3600),
            callback_timeout_seconds=r.number("CALLBACK_TIMEOUT_SECONDS", 15.0, 0.5, 120),
            outbox_interval_seconds=r.number("OUTBOX_INTERVAL_SECONDS", 10.0, 0.1, 3600),
            cold_stop_settle_seconds=r.number("WORKER_COLD_STOP_SETTLE_SECONDS", 5.0, 0, 60),
            job_timeout_grace_seconds=r.number("JOB_TIMEOUT_GRACE_SECONDS", 30.0, 0.5, 3600),
            job_timeout_sdxl_seconds=r.number("JOB_TIMEOUT_SDXL_SECONDS", 300.0, 1, 86400),
            job_timeout_wan_video_seconds=r.number("JOB_TIMEOUT_WAN_VIDEO_SECONDS", 1200.0, 1, 86400),
            job_timeout_wan_image_seconds=r.number("JOB_TIMEOUT_WAN_IMAGE_SECONDS", 300.0, 1, 86400),
            job_timeout_chat_seconds=r.number("JOB_TIMEOUT_CHAT_SECONDS", 120.0, 1, 86400),
            worker_breaker_threshold=int(r.number("WORKER_BREAKER_THRESHOLD", 5, 2, 1000)),
            wan_worker_api_key=r.secret("WAN_WORKER_API_KEY"),
            chat_worker_api_key=r.secret("CHAT_WORKER_API_KEY"),
            worker_admin_key=r.secret("WORKER_ADMIN_KEY"),
            allow_anonymous=r.boolean("ALLOW_ANONYMOUS_API", False),
            http_read_timeout_seconds=r.number("HTTP_READ_TIMEOUT_SECONDS", 10.0, 0.5, 600),
            runpod_pod_id=r.identifier("RUNPOD_POD_ID"),
            public_base_url=r.url("PUBLIC_BASE_URL"),
            worker_id=r.identifier("WORKER_ID"),
            reference_allow_hosts=frozenset(h.strip().lower().strip("[]")
                                            for h in r.text("REFERENCE_ALLOW_HOSTS", "").split(",") if h.strip()),
            reference_failure_policy=r.choice("REFERENCE_FAILURE_POLICY", ("fallback", "fail"), "fallback"),
            reference_max_bytes=int(r.number("REFERENCE_MAX_BYTES", 20 * 1024 * 1024, 1024, 1 << 31)),
            reference_timeout_seconds=r.number("REFERENCE_TIMEOUT_SECONDS", 15.0, 0.5, 300),
            sdxl_model_path=r.path("SDXL_MODEL_PATH"),
            sdxl_config_path=r.path("SDXL_CONFIG_PATH"),
            wan_model_path=r.path("WAN_MODEL_PATH"),
            wan_vace_model_path=r.path("WAN_VACE_MODEL_PATH"),
            wan_enhance_template=r.path("WAN_ENHANCE_TEMPLATE"),
            wan_enhance_timeout_seconds=r.number("WAN_ENHANCE_TIMEOUT_SECONDS", 20.0, 0.5, 300),
            wan_batched_cfg=r.boolean("WAN_BATCHED_CFG", True),
            qwen_instruct_path=r.path("QWEN_INSTRUCT_PATH"),
            qwen_base_path=r.path("QWEN_BASE_PATH"),
            chat_worker_url=r.url("CHAT_WORKER_URL") or "http://127.0.0.1:7861",
            memory_manager_url=r.url("MEMORY_MANAGER_URL") or "http://127.0.0.1:7870",
            gpu_index=int(r.number("FLEET_GPU_INDEX", 0, 0, 63)),
            device=r.text("DEVICE", "auto"),
            torch_compile=r.boolean("TORCH_COMPILE", False),
            sdxl_attention=r.choice("SDXL_ATTENTION", ("sdpa", "xformers"), "sdpa"),
            cuda_graphs=r.boolean("CUDA_GRAPHS", True),
            compile_blocks=r.boolean("COMPILE_BLOCKS", True),
            max_prompt_chars=int(r.number("MAX_PROMPT_CHARS", 2000, 1, 100_000)),
            qwen_base_preload=r.boolean("QWEN_BASE_PRELOAD", False),
            chat_max_batch=int(r.number("CHAT_MAX_BATCH", 16, 1, 256)),
            chat_max_context_tokens=int(r.number("CHAT_MAX_CONTEXT_TOKENS", 8192, 64, 1_048_576)),
            chat_request_timeout_seconds=r.number("CHAT_REQUEST_TIMEOUT_SECONDS", 60.0, 1, 3600),
            chat_max_waiting=int(r.number("CHAT_MAX_WAITING", 8, 0, 100_000)),
            chat_reload_wait_seconds=r.number("CHAT_RELOAD_WAIT_SECONDS", 30.0, 0, 600),
            chat_sfw_words_path=r.path("CHAT_SFW_WORDS_PATH"),
            chat_enhance_template_path=r.path("CHAT_ENHANCE_TEMPLATE_PATH"),
            chat_static_cache=r.boolean("CHAT_STATIC_CACHE", True),
            chat_cuda_graphs=r.boolean("CHAT_CUDA_GRAPHS", True),
            chat_compile_decode=r.boolean("CHAT_COMPILE_DECODE", False),
        )
        if settings.poll_min_seconds > settings.poll_max_seconds:
            raise ConfigError("QUEUE_POLL_MIN_SECONDS must not exceed QUEUE_POLL_MAX_SECONDS")
        if settings.upstash_url and not settings.upstash_token and not settings.redis_url:
            raise ConfigError("UPSTASH_REDIS_REST_TOKEN is required with UPSTASH_REDIS_REST_URL")
        return settings

    def require(self, *names: str) -> None:
        """Raise ``ConfigError`` naming the first of these settings (by env variable) that is unset."""
        for name in names:
            if getattr(self, name) in (None, ""):
                raise ConfigError(f"{ENV_NAMES.get(name, name.upper())} is not set")

    def is_set(self) -> dict[str, bool]:
        """Which settings have a value (names only, for /debug/env: never a value)."""
        default = Settings()
        return {ENV_NAMES.get(f.name, f.name.upper()): getattr(self, f.name) != getattr(default, f.name)
                for f in fields(self)}

    @property
    def redis_configured(self) -> bool:
        return bool(self.redis_url or (self.upstash_url and self.upstash_token))


ENV_NAMES = {
    "supabase_service_key": "SUPABASE_SERVICE_KEY", "upstash_url": "UPSTASH_REDIS_REST_URL",
    "upstash_token": "UPSTASH_REDIS_REST_TOKEN", "allow_anonymous": "ALLOW_ANONYMOUS_API",
    "heartbeat_ttl_seconds": "WORKER_HEARTBEAT_TTL_SECONDS", "max_attempts": "JOB_MAX_ATTEMPTS",
}


class Reader:
    """Parses one variable at a time; every error names the variable and never echoes its value."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def text(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def secret(self, name: str) -> Secret | None:
        value = self.raw(name)
        return Secret(value) if value else None

    def _parse(self, name: str, default: T, parse: Callable[[str], T], expected: str) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse(value)
        except (ValueError, TypeError):
            raise ConfigError(f"{name} must be {expected}") from None

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        def parse(value: str) -> float:
            number = float(value)
            if not lo <= number <= hi:
                raise ValueError
            return number
        return self._parse(name, default, parse, f"a number between {lo:g} and {hi:g}")

    def boolean(self, name: str, default: bool) -> bool:
        table = {"1": True, "true": True, "yes": True, "on": True,
                 "0": False, "false": False, "no": False, "off": False}
        return self._parse(name, default, lambda v: table[v.lower()] if v.lower() in table else _bad(),
                           "true or false")

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        return self._parse(name, default, lambda v: v.lower() if v.lower() in options else _bad(),
                           "one of " + ", ".join(options))

    def url(self, name: str) -> str | None:
        def parse(value: str) -> str:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError
            return value.rstrip("/")
        return self._parse(name, None, parse, "an http(s) URL")

    def identifier(self, name: str) -> str | None:
        def parse(value: str) -> str:
            if not all(c.isalnum() or c in "-_." for c in value) or len(value) > 128:
                raise ValueError
            return value
        return self._parse(name, None, parse, "letters, digits, '-', '_' or '.' (at most 128)")

    def path(self, name: str) -> Path | None:
        value = self.raw(name)
        return Path(value).expanduser() if value else None


def _bad():
    raise ValueError


