"""The fleet's shared settings groups, and ``Settings``: what the job runtime of every worker reads.

Each group declares its variables once (``common.declare``); a process's settings class inherits the groups
it uses. ``Settings`` is the worker runtime (queue, callbacks, storage, life cycle, control); each model kind
extends it with its own groups (``workers/<kind>/settings.py``), so a chat worker never parses ``WAN_*``. The
model-path groups live here because the orchestrator checks them without importing any worker code.

Library code never reads ``os.environ``: every process parses its class once at the edge
(``SdxlSettings.from_env(os.environ)``). README.md's "Settings" tables are generated from these declarations.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.declare import Declared, var
from common.errors import ConfigError
from common.parsers import (
    Reader,
    Secret,
    boolean,
    choice,
    host_list,
    identifier,
    integer,
    number,
    path,
    secret,
    text,
    torch_device,
    url,
)

__all__ = ["Reader", "Secret", "Settings"]


@dataclass(frozen=True)
class SupabaseAccess(Declared):
    """Supabase"""

    supabase_url: str | None = var("SUPABASE_URL", url(), None,
                                   "the app's Supabase project: callbacks, storage uploads, registration")
    supabase_service_key: Secret | None = var(
        "SUPABASE_SERVICE_KEY", secret(), None, "service key, sent as Bearer and `apikey`",
        aliases=("SUPABASE_SERVICE_ROLE_KEY",))


@dataclass(frozen=True)
class Callbacks(Declared):
    """Callbacks"""

    job_callback_secret: Secret | None = var("JOB_CALLBACK_SECRET", secret(), None,
                                             "HMAC key of `X-Callback-Signature` (required to run a job loop)")
    callback_retry_seconds: float = var("CALLBACK_RETRY_SECONDS", number(0, 3600), 240.0,
                                        "terminal-callback retry budget: the next try still starts within this")
    callback_timeout_seconds: float = var("CALLBACK_TIMEOUT_SECONDS", number(0.5, 120), 15.0,
                                          "per-request timeout of a callback")
    callback_retry_first_seconds: float = var(
        "CALLBACK_RETRY_FIRST_SECONDS", number(0.01, 30), 1.0,
        "wait before a terminal callback's second try; each later wait doubles (1, 2, 4 … 30 s), plus up to as "
        "much jitter")
    outbox_interval_seconds: float = var(
        "OUTBOX_INTERVAL_SECONDS", number(0.1, 3600), 10.0,
        "how often each worker's outbox sender tries the owed terminal callbacks (one try per entry, under its lease)")


@dataclass(frozen=True)
class Storage(Declared):
    """Storage"""

    storage_bucket: str = var("STORAGE_BUCKET", text(), "workspace-temp", "bucket name")
    storage_dir: Path | None = var("STORAGE_DIR", path(), None,
                                   "local storage backend instead of Supabase Storage (same bucket/path layout)")
    storage_retry_first_seconds: float = var(
        "STORAGE_RETRY_FIRST_SECONDS", number(0.01, 8), 1.0,
        "wait before an upload's second try; each later wait doubles (1, 2, 4 s), plus up to as much jitter")


@dataclass(frozen=True)
class QueueConnection(Declared):
    """Queue connection"""

    redis_url: Secret | None = var("REDIS_URL", secret(), None,
                                   "queues over the Redis protocol (`redis://`, `rediss://`); wins when set")
    upstash_url: str | None = var("UPSTASH_REDIS_REST_URL", url(), None, "queues over Upstash REST")
    upstash_token: Secret | None = var("UPSTASH_REDIS_REST_TOKEN", secret(), None,
                                       "Upstash REST token (required with `UPSTASH_REDIS_REST_URL`)")

    def _check(self) -> None:
        if self.upstash_url and not self.upstash_token and not self.redis_url:
            raise ConfigError("UPSTASH_REDIS_REST_TOKEN is required with UPSTASH_REDIS_REST_URL")

    @property
    def redis_configured(self) -> bool:
        return bool(self.redis_url or (self.upstash_url and self.upstash_token))


@dataclass(frozen=True)
class Queue(Declared):
    """Queue"""

    queue_pop_side: str = var("QUEUE_POP_SIDE", choice("left", "right"), "left",
                              "`left` = FIFO for RPUSH producers; `right` for LPUSH producers")
    poll_min_seconds: float = var("QUEUE_POLL_MIN_SECONDS", number(0.01, 60), 0.1,
                                  "REST polling backoff: the first wait after an empty poll")
    poll_max_seconds: float = var("QUEUE_POLL_MAX_SECONDS", number(0.01, 300), 2.0,
                                  "REST polling backoff cap; the blocking wait on `redis://`")
    heartbeat_ttl_seconds: int = var("WORKER_HEARTBEAT_TTL_SECONDS", integer(2, 3600), 30,
                                     "heartbeat TTL; a worker silent this long is reaped")
    max_attempts: int = var("JOB_MAX_ATTEMPTS", integer(1, 100), 3, "attempts before a job goes to the dead list")
    redis_timeout_seconds: float = var("REDIS_TIMEOUT_SECONDS", number(0.5, 120), 10.0,
                                       "per-request timeout to Redis / Upstash")

    def _check(self) -> None:
        if self.poll_min_seconds > self.poll_max_seconds:
            raise ConfigError("QUEUE_POLL_MIN_SECONDS must not exceed QUEUE_POLL_MAX_SECONDS")


@dataclass(frozen=True)
class Lifecycle(Declared):
    """Worker life cycle"""

    stop_grace_seconds: float = var(
        "WORKER_STOP_GRACE_SECONDS", number(0, 86400), 300.0,
        "warm-stop grace before the current job is handed back (the orchestrator passes `FLEET_STOP_GRACE_SECONDS`)")
    cold_stop_settle_seconds: float = var(
        "WORKER_COLD_STOP_SETTLE_SECONDS", number(0, 60), 5.0,
        "how long a cold stop waits for a job that is already delivering its terminal callback "
        "(keep it below `FLEET_KILL_AFTER_SECONDS`)")
    job_timeout_grace_seconds: float = var(
        "JOB_TIMEOUT_GRACE_SECONDS", number(0.5, 3600), 30.0,
        "how long a job may run past its deadline (it is cancelled at its next progress call) before the watchdog "
        "hands it back counted and the worker exits `WATCHDOG`")
    job_timeout_sdxl_seconds: float = var("JOB_TIMEOUT_SDXL_SECONDS", number(1, 86400), 300.0,
                                          "deadline of an SDXL job: past it the job's next progress call cancels "
                                          "it with `TIMEOUT_ERROR`, retried like any retryable failure")
    job_timeout_wan_video_seconds: float = var("JOB_TIMEOUT_WAN_VIDEO_SECONDS", number(1, 86400), 1200.0,
                                               "deadline of a WAN video job")
    job_timeout_wan_image_seconds: float = var("JOB_TIMEOUT_WAN_IMAGE_SECONDS", number(1, 86400), 300.0,
                                               "deadline of a WAN image job")
    job_timeout_chat_seconds: float = var("JOB_TIMEOUT_CHAT_SECONDS", number(1, 86400), 120.0,
                                          "deadline of a chat job (`chat_*` and `admin_utilities`)")
    cancel_check_seconds: float = var(
        "CANCEL_CHECK_SECONDS", number(0, 3600), 10.0,
        "how often a running job reads its `jobs` row to learn the app cancelled it (once before it starts too; "
        "`0` = never; off without Supabase)")
    worker_breaker_threshold: int = var(
        "WORKER_BREAKER_THRESHOLD", integer(2, 1000), 5,
        "jobs in a row failing for reasons not theirs (unexpected exceptions such as CUDA errors, `OOM_ERROR`, "
        "`MODEL_LOAD_ERROR`) that stop the worker: its job goes back uncounted, `/health` 503, exit "
        "`BREAKER_OPEN` (keep it above `JOB_MAX_ATTEMPTS`, or one poison job alone restarts the worker)")
    worker_breaker_pause_seconds: float = var(
        "WORKER_BREAKER_PAUSE_SECONDS", number(0, 60), 1.0,
        "after a failure that is not the job's fault, the pause before the next fetch, times such failures in "
        "a row (so that a healthy worker likely takes the retry)")
    log_level: str = var("LOG_LEVEL", choice("debug", "info", "warning", "error"), "info",
                         "log level of a worker process")


@dataclass(frozen=True)
class ClientKeys(Declared):
    """Client keys"""

    wan_worker_api_key: Secret | None = var("WAN_WORKER_API_KEY", secret(), None,
                                            "client key of the chat and WAN routes (either key is accepted)")
    chat_worker_api_key: Secret | None = var(
        "CHAT_WORKER_API_KEY", secret(), None,
        "client key of the chat and WAN routes; the WAN worker also calls the chat worker's `/enhance` with it")
    allow_anonymous: bool = var("ALLOW_ANONYMOUS_API", boolean(), False,
                                "accept client calls with no Authorization header at all")


@dataclass(frozen=True)
class AdminKey(Declared):
    """Admin key"""

    worker_admin_key: Secret | None = var(
        "WORKER_ADMIN_KEY", secret(), None,
        "key of the control routes (`/memory/load`, `/memory/unload`, `/debug/env`, the memory manager's "
        "reservations); unset = control routes refuse everything")


@dataclass(frozen=True)
class Serving(Declared):
    """HTTP serving"""

    http_read_timeout_seconds: float = var(
        "HTTP_READ_TIMEOUT_SECONDS", number(0.5, 600), 10.0,
        "every HTTP server of the fleet: the request line, headers and body must all arrive within this, or the "
        "client gets 408 and is disconnected")


@dataclass(frozen=True)
class Logs(Declared):
    """Logs"""

    log_format: str = var("LOG_FORMAT", choice("text", "json"), "text",
                          "`text` (each process's own line format) or `json`: one JSON object per line, with "
                          "`job_id`, `job_type`, `worker_id` and `attempt` on the lines logged while a job runs")


@dataclass(frozen=True)
class Pod(Declared):
    """Pod"""

    runpod_pod_id: str | None = var("RUNPOD_POD_ID", identifier(), None,
                                    "the RunPod pod: prefix of worker ids; registered as "
                                    "`https://<RUNPOD_POD_ID>-<port>.proxy.runpod.net`")


@dataclass(frozen=True)
class PublicAddress(Declared):
    """Public address"""

    public_base_url: str | None = var("PUBLIC_BASE_URL", url(), None,
                                      "the URL registered with the app instead of the RunPod proxy's")


@dataclass(frozen=True)
class Identity(Declared):
    """Worker identity"""

    worker_id: str | None = var(
        "WORKER_ID", identifier(), None,
        "prefix of every worker process's id (`<prefix>-<kind>-<slot>-<6 random hex>`, new for each process)",
        shown="`RUNPOD_POD_ID`, else the hostname")


@dataclass(frozen=True)
class MemoryClient(Declared):
    """Memory manager client"""

    memory_manager_url: str = var("MEMORY_MANAGER_URL", url(), "http://127.0.0.1:7870",
                                  "the memory manager a worker reserves GPU memory with (set by the orchestrator)")
    gpu_index: int = var("FLEET_GPU_INDEX", integer(0, 63), 0,
                         "set by the orchestrator: the fleet GPU a worker runs on")


@dataclass(frozen=True)
class GpuCount(Declared):
    """GPUs"""

    gpu_count: int | None = var("GPU_COUNT", integer(0, 64), None,
                                "number of GPUs: the orchestrator's placement, the memory manager's `capacity` probe",
                                shown="detected (the `capacity` probe: 1)")


@dataclass(frozen=True)
class Device(Declared):
    """Device"""

    device: str = var("DEVICE", torch_device(), "auto",
                      "torch device: `auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`")


@dataclass(frozen=True)
class Diffusion(Declared):
    """Diffusion models (SDXL, WAN)"""

    torch_compile: bool = var("TORCH_COMPILE", boolean(), False,
                              "compile the denoisers (warmed up before ready); turns `CUDA_GRAPHS` off")
    cuda_graphs: bool = var(
        "CUDA_GRAPHS", boolean(), True,
        "on CUDA, replay the SDXL UNet and text encoders, and the WAN transformer at small sizes (≤ 8,192 latent "
        "tokens, e.g. single frames), as one CUDA graph per input shape: same kernels, same results, without the "
        "per-kernel host cost; SDXL captures 1024² × 1/3/6 images at start, other shapes on first use")
    compile_blocks: bool = var(
        "COMPILE_BLOCKS", boolean(), True,
        "on CUDA, `torch.compile` the transformer blocks of the SDXL UNet and the WAN transformers in place "
        "(regional compilation: one compiled graph shared by every block, dynamic shapes) in the warm-up before "
        "ready (~10 s each on an H100; VACE's own blocks on its first job); a step 10 % (SDXL) to 18 % (WAN "
        "video) faster, results within bf16 rounding; falls back to the plain blocks if a compile fails")
    max_prompt_chars: int = var("MAX_PROMPT_CHARS", integer(1, 100_000), 2000, "longest accepted prompt")


@dataclass(frozen=True)
class References(Declared):
    """Reference images"""

    reference_allow_hosts: frozenset[str] = var(
        "REFERENCE_ALLOW_HOSTS", host_list(), frozenset(),
        "hosts allowed for reference downloads even if they resolve to private addresses")
    reference_failure_policy: str = var(
        "REFERENCE_FAILURE_POLICY", choice("fallback", "fail"), "fallback",
        "`fallback` (generate without, reported) or `fail` (`REFERENCE_FRAME_ERROR`)")
    reference_max_bytes: int = var("REFERENCE_MAX_BYTES", integer(1024, 1 << 31), 20 * 1024 * 1024,
                                   "download cap of a reference image", shown="20 MiB")
    reference_timeout_seconds: float = var("REFERENCE_TIMEOUT_SECONDS", number(0.5, 300), 15.0,
                                           "deadline of a reference download (connect, redirects, body)")


@dataclass(frozen=True)
class SdxlModel(Declared):
    """SDXL model"""

    sdxl_model_path: Path | None = var("SDXL_MODEL_PATH", path(), None, "SDXL single file or diffusers folder")
    sdxl_config_path: Path | None = var("SDXL_CONFIG_PATH", path(), None, "config folder for a single-file SDXL")


@dataclass(frozen=True)
class WanModel(Declared):
    """WAN models"""

    wan_model_path: Path | None = var("WAN_MODEL_PATH", path(), None, "Wan 2.1 T2V 1.3B diffusers folder")
    wan_vace_model_path: Path | None = var("WAN_VACE_MODEL_PATH", path(), None,
                                           "Wan 2.1 VACE 1.3B diffusers folder (reference frames)")


@dataclass(frozen=True)
class ChatModels(Declared):
    """Chat models"""

    qwen_instruct_path: Path | None = var("QWEN_INSTRUCT_PATH", path(), None, "Qwen instruct transformers folder")
    qwen_base_path: Path | None = var("QWEN_BASE_PATH", path(), None, "Qwen base transformers folder")


@dataclass(frozen=True)
class Settings(SupabaseAccess, Callbacks, Storage, QueueConnection, Queue, Lifecycle, AdminKey, Serving, Logs,
               Pod, Identity, MemoryClient):
    """The worker runtime's settings: what ``workers/core`` reads, whatever the model kind."""
