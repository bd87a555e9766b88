"""Declared settings: every variable parsed from its one declaration, errors naming the variable and never the
value, each process parsing only its own groups, ``is_set`` reporting declared names only."""
from __future__ import annotations

import pytest

from common.declare import Declared
from common.errors import ConfigError
from common.parsers import Reader, Secret
from common.settings import Settings
from memory_manager.config import MemorySettings
from orchestrator.config import FleetSettings, StartupSettings
from router.config import RouterSettings
from tests.test_settings_doc import CLASSES
from workers.chat.settings import ChatSettings
from workers.sdxl.settings import SdxlSettings
from workers.wan.settings import WanSettings

MALFORMED = "zz 'not/a value Q7!"
FREE_TEXT = ("text", "a path", "a comma-separated list of hosts")   # parsers that take any text


def checked_variables(cls: type[Declared]) -> list[str]:
    """The variables of ``cls`` whose parser refuses ``MALFORMED``."""
    return [name for _, v in cls.declarations() if v.parser.expected not in FREE_TEXT
            for name in (*v.names(), *v.aliases)]


def every_variable() -> set[str]:
    return {name for cls in CLASSES for name in cls.env_names()}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_malformed_value_of_any_variable_is_one_line_naming_it_never_echoing_it(cls: type[Declared]) -> None:
    variables = checked_variables(cls)
    assert variables
    for name in variables:
        with pytest.raises(ConfigError) as caught:
            cls.from_env({name: MALFORMED})
        message = str(caught.value)
        assert message.startswith(name) and "\n" not in message and MALFORMED not in message, (name, message)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_process_parses_no_variable_it_does_not_read(cls: type[Declared]) -> None:
    others = sorted(every_variable() - set(cls.env_names()))
    settings = cls.from_env({name: MALFORMED for name in others})
    assert settings == cls.from_env({})


def test_the_kinds_and_processes_read_only_their_own_groups() -> None:
    assert not any(name.startswith("WAN_") and name != "WAN_WORKER_API_KEY" for name in ChatSettings.env_names())
    assert not any(name.startswith(("CHAT_", "QWEN_")) for name in SdxlSettings.env_names())
    assert "SDXL_ATTENTION" not in WanSettings.env_names() and "CHAT_MAX_BATCH" not in WanSettings.env_names()
    assert not any(name.startswith(("JOB_", "QUEUE_", "SUPABASE_")) for name in RouterSettings.env_names())
    # the ops page reads queue depths: the connection only, none of the queue's behaviour (REDIS_TIMEOUT_SECONDS...)
    assert {n for n in RouterSettings.env_names() if "REDIS" in n} == {
        "REDIS_URL", "UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN"}
    assert set(MemorySettings.env_names()) - {"WORKER_ADMIN_KEY", "HTTP_READ_TIMEOUT_SECONDS", "GPU_COUNT",
                                             "LOG_FORMAT"} == {
        n for n in MemorySettings.env_names() if n.startswith("MEMORY_") or n.endswith("_PORT")}
    assert {n for n in StartupSettings.env_names() if "PATH" not in n} == {
        "WORKER_ADMIN_KEY", "REDIS_URL", "UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN"}
    assert all(name.startswith(("FLEET_", "ORCHESTRATOR_", "GPU_", "LOG_")) or name.endswith("_PORT")
               for name in FleetSettings.env_names())


def test_each_variable_is_declared_by_one_group_only() -> None:
    owners: dict[str, set[str]] = {}
    for cls in CLASSES:
        for klass in cls.__mro__:
            for name in klass.__dict__.get("__annotations__", {}):
                declared = klass.__dict__.get("__dataclass_fields__", {}).get(name)
                if declared is not None and "var" in declared.metadata:
                    for variable in declared.metadata["var"].names():
                        owners.setdefault(variable, set()).add(klass.__qualname__)
    assert {name: groups for name, groups in owners.items() if len(groups) > 1} == {}


def test_defaults_and_values() -> None:
    sdxl = SdxlSettings.from_env({"JOB_MAX_ATTEMPTS": "5", "QUEUE_POP_SIDE": "RIGHT", "CUDA_GRAPHS": "off",
                                  "REFERENCE_ALLOW_HOSTS": " A.example, [::1] ,", "SDXL_MODEL_PATH": "~/m",
                                  "MEMORY_MANAGER_URL": "http://mm:7870/", "WORKER_HEARTBEAT_TTL_SECONDS": "40.0"})
    assert sdxl.max_attempts == 5 and sdxl.queue_pop_side == "right" and sdxl.cuda_graphs is False
    assert sdxl.reference_allow_hosts == frozenset({"a.example", "::1"}) and sdxl.sdxl_model_path.name == "m"
    assert sdxl.memory_manager_url == "http://mm:7870" and sdxl.heartbeat_ttl_seconds == 40
    assert SdxlSettings.from_env({"SDXL_MODEL_PATH": "  "}).sdxl_model_path is None   # blank = unset
    assert SdxlSettings() == SdxlSettings.from_env({})
    assert RouterSettings.from_env({"ROUTER_MAX_BODY_MB": "0.5"}).max_body_bytes == 512 * 1024


def test_whole_numbers_are_whole() -> None:
    with pytest.raises(ConfigError, match="JOB_MAX_ATTEMPTS must be a whole number between 1 and 100"):
        Settings.from_env({"JOB_MAX_ATTEMPTS": "2.5"})
    with pytest.raises(ConfigError, match="JOB_MAX_ATTEMPTS"):
        Settings.from_env({"JOB_MAX_ATTEMPTS": "101"})


def test_the_service_key_alias() -> None:
    assert Settings.from_env({"SUPABASE_SERVICE_ROLE_KEY": "k"}).supabase_service_key == Secret("k")
    both = Settings.from_env({"SUPABASE_SERVICE_KEY": "primary", "SUPABASE_SERVICE_ROLE_KEY": "alias"})
    assert both.supabase_service_key == Secret("primary")
    assert "SUPABASE_SERVICE_ROLE_KEY" in Settings.env_names()


@pytest.mark.parametrize("env, message", [
    ({"QUEUE_POLL_MIN_SECONDS": "5", "QUEUE_POLL_MAX_SECONDS": "1"}, "QUEUE_POLL_MIN_SECONDS must not exceed"),
    ({"UPSTASH_REDIS_REST_URL": "https://u.example"}, "UPSTASH_REDIS_REST_TOKEN is required"),
])
def test_cross_field_rules(env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ChatSettings.from_env(env)
    assert Settings.from_env({"UPSTASH_REDIS_REST_URL": "https://u.example", "REDIS_URL": "redis://r"}).redis_url


def test_ports_must_differ_in_every_process_that_reads_them() -> None:
    for cls in (RouterSettings, MemorySettings, FleetSettings):
        with pytest.raises(ConfigError, match="must differ"):
            cls.from_env({"SDXL_PORT": "7861"})
    assert RouterSettings.from_env({"WAN_PORT": "9000"}).url("wan") == "http://127.0.0.1:9000"


@pytest.mark.parametrize("value, parsed", [("auto", "auto"), ("CPU", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda:1"),
                                           (" cuda:12 ", "cuda:12")])
def test_device_names(value: str, parsed: str) -> None:
    assert ChatSettings.from_env({"DEVICE": value}).device == parsed


@pytest.mark.parametrize("value", ["tpu", "cuda:", "cuda:x", "cuda:-1", "cpu:0", "mps", "gpu"])
def test_device_names_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="^DEVICE must be auto, cpu, cuda or cuda:N$"):
        WanSettings.from_env({"DEVICE": value})


def test_log_level_and_stop_grace() -> None:
    assert Settings.from_env({}).log_level == "info" and Settings.from_env({}).stop_grace_seconds == 300
    assert Settings.from_env({"LOG_LEVEL": "WARNING"}).log_level == "warning"
    assert Settings.from_env({"WORKER_STOP_GRACE_SECONDS": "90"}).stop_grace_seconds == 90
    with pytest.raises(ConfigError, match="LOG_LEVEL must be one of debug, info, warning, error"):
        Settings.from_env({"LOG_LEVEL": "verbose"})


def test_is_set_reports_declared_names_only_and_never_a_value() -> None:
    settings = WanSettings.from_env({"WORKER_ADMIN_KEY": "hunter2", "QUEUE_POLL_MIN_SECONDS": "0.5",
                                     "FLEET_GPU_INDEX": "1", "SUPABASE_SERVICE_ROLE_KEY": "k"})
    report = settings.is_set()
    assert set(report) <= set(WanSettings.env_names())
    assert {"GPU_INDEX", "POLL_MIN_SECONDS", "POLL_MAX_SECONDS"}.isdisjoint(report)
    assert report["WORKER_ADMIN_KEY"] and report["QUEUE_POLL_MIN_SECONDS"] and report["FLEET_GPU_INDEX"]
    assert report["SUPABASE_SERVICE_KEY"] and not report["REDIS_URL"]
    assert all(isinstance(v, bool) for v in report.values()) and "hunter2" not in repr(report)
    ports = FleetSettings.from_env({"ROUTER_PORT": "9000"}).is_set()
    assert ports["ROUTER_PORT"] and not ports["SDXL_PORT"] and not ports["FLEET_COMMAND_SDXL"]


def test_require_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="^SDXL_MODEL_PATH is not set$"):
        SdxlSettings().require("sdxl_model_path")
    with pytest.raises(ConfigError, match="^SUPABASE_SERVICE_KEY is not set$"):
        Settings(supabase_url="https://x.example").require("supabase_url", "supabase_service_key")
    assert StartupSettings.env_of("qwen_base_path") == "QWEN_BASE_PATH"


def test_secrets_never_show_themselves() -> None:
    settings = ChatSettings.from_env({"CHAT_WORKER_API_KEY": "hunter2", "REDIS_URL": "redis://:pw@h"})
    assert "hunter2" not in repr(settings) and "pw@h" not in repr(settings)
    assert settings.chat_worker_api_key.reveal() == "hunter2"


def test_the_reader_for_undeclared_knobs() -> None:
    r = Reader({"A": " 2 ", "B": "yes", "C": "nope"})
    assert r.number("A", 1, 0, 5) == 2 and r.boolean("B", False) is True and r.number("Z", 1.5, 0, 5) == 1.5
    with pytest.raises(ConfigError, match="^C must be true or false$"):
        r.boolean("C", False)
