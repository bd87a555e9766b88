"""Fleet settings, GPU placement, the programs' commands and environments, the start-up report."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.settings import Settings
from orchestrator.checks import parse_nvidia_smi, startup_report
from orchestrator.config import FleetSettings, StartupSettings
from orchestrator.fleet import build_specs
from orchestrator.placement import Placement, place
from router.config import RouterSettings


def test_defaults() -> None:
    fleet = FleetSettings.from_env({})
    assert fleet.programs == ("memory_manager", "router", "registration", "sdxl", "chat", "wan")
    assert dict(fleet.ports) == {"memory_manager": 7870, "router": 7860, "registration": 7872, "sdxl": 7859,
                                 "chat": 7861, "wan": 7862}
    assert fleet.status_port == 7871 and fleet.gpu_count is None and fleet.start_timeouts["wan"] == 900
    assert fleet.start_timeouts["registration"] == 30
    assert fleet.unhealthy_restart_checks == 6
    assert FleetSettings.from_env({"FLEET_UNHEALTHY_RESTART_CHECKS": "0"}).unhealthy_restart_checks == 0


def test_parsing() -> None:
    env = {"FLEET_PROGRAMS": "wan, registration, memory, sdxl", "GPU_PLACEMENT": "sdxl:1,wan:0",
           "FLEET_START_TIMEOUTS": "wan:1200,registration:5", "FLEET_COMMAND_SDXL": "my-sdxl --port {port}",
           "GPU_COUNT": "2", "ROUTER_MAX_BODY_MB": "2", "REGISTRATION_PORT": "9000"}
    fleet = FleetSettings.from_env(env)
    assert fleet.programs == ("memory_manager", "registration", "sdxl", "wan")  # always in start order
    assert dict(fleet.gpu_placement) == {"sdxl": 1, "wan": 0} and fleet.gpu_count == 2
    assert fleet.start_timeouts["wan"] == 1200 and fleet.start_timeouts["sdxl"] == 900
    assert fleet.start_timeouts["registration"] == 5 and fleet.ports["registration"] == 9000
    assert fleet.commands == {"sdxl": ("my-sdxl", "--port", "{port}")}
    assert RouterSettings.from_env(env).max_body_bytes == 2 * 1024 * 1024  # the router's own settings


@pytest.mark.parametrize("env, named", [
    ({"FLEET_PROGRAMS": "sdxl,video"}, "FLEET_PROGRAMS"),
    ({"GPU_PLACEMENT": "sdxl=1"}, "GPU_PLACEMENT"),
    ({"GPU_PLACEMENT": "router:0"}, "GPU_PLACEMENT"),
    ({"SDXL_PORT": "7861"}, "must differ"),
    ({"REGISTRATION_PORT": "7860"}, "must differ"),
    ({"REGISTRATION_PORT": "0"}, "REGISTRATION_PORT"),
    ({"GPU_PLACEMENT": "registration:0"}, "GPU_PLACEMENT"),
    ({"ORCHESTRATOR_STATUS_PORT": "7860"}, "ORCHESTRATOR_STATUS_PORT"),
    ({"FLEET_COMMAND_CHAT": "'unclosed"}, "FLEET_COMMAND_CHAT"),
    ({"FLEET_BACKOFF_BASE_SECONDS": "100", "FLEET_BACKOFF_MAX_SECONDS": "10"}, "FLEET_BACKOFF"),
    ({"FLEET_UNHEALTHY_RESTART_CHECKS": "-1"}, "FLEET_UNHEALTHY_RESTART_CHECKS"),
])
def test_bad_values_name_the_variable(env: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        FleetSettings.from_env(env)


def test_placement() -> None:
    workers = ["sdxl", "chat", "wan"]
    assert place(workers, 1, {}) == {w: Placement(0, None) for w in workers}   # one GPU: shared, inherited
    assert place(workers, 0, {}) == {w: Placement(0, None) for w in workers}
    assert place(workers, 2, {}) == {"sdxl": Placement(0, "0"), "chat": Placement(1, "1"), "wan": Placement(0, "0")}
    assert place(workers, 4, {}) == {"sdxl": Placement(0, "0"), "chat": Placement(1, "1"), "wan": Placement(2, "2")}
    assert place(workers, 2, {"sdxl": 0, "chat": 1, "wan": 1})["wan"] == Placement(1, "1")
    assert place(["chat", "wan"], 2, {"chat": 1}) == {"chat": Placement(1, "1"), "wan": Placement(0, "0")}
    assert place(workers, 2, {}, inherited_visible="4,6") == {
        "sdxl": Placement(0, "4"), "chat": Placement(1, "6"), "wan": Placement(0, "4")}
    with pytest.raises(ConfigError, match="GPU 3"):
        place(workers, 2, {"wan": 3})
    with pytest.raises(ConfigError, match="only 1 GPU"):
        place(workers, 1, {"wan": 1})


def test_specs_commands_and_environments(tmp_path: Path) -> None:
    env = {"SDXL_MODEL_PATH": str(tmp_path), "WAN_MODEL_PATH": str(tmp_path), "CHAT_WORKER_URL": "http://c:1",
           "SOMETHING": "passed through", "GPU_PLACEMENT": "wan:1"}
    fleet = FleetSettings.from_env(env, python="/py")
    specs = {s.name: s for s in build_specs(StartupSettings.from_env(env), fleet, env, gpu_count=2)}
    assert list(specs) == ["memory_manager", "router", "registration", "sdxl", "wan"]  # chat skipped: no Qwen path
    assert specs["memory_manager"].command == ("/py", "-m", "memory_manager", "--port", "7870")
    assert specs["router"].command == ("/py", "-m", "router", "--port", "7860")
    assert specs["router"].health_url == "http://127.0.0.1:7860/router/health"
    assert specs["registration"].command == ("/py", "-m", "registration", "--port", "7872")
    assert specs["registration"].health_url == "http://127.0.0.1:7872/health"
    assert specs["registration"].start_timeout == 30 and specs["registration"].gpu is None
    assert "FLEET_GPU_INDEX" not in specs["registration"].env
    assert specs["sdxl"].command == ("/py", "-m", "workers", "sdxl", "--port", "7859")
    assert specs["sdxl"].env["WORKER_STOP_GRACE_SECONDS"] == "90"
    assert specs["sdxl"].env["CUDA_VISIBLE_DEVICES"] == "0" and specs["wan"].env["CUDA_VISIBLE_DEVICES"] == "1"
    assert specs["wan"].env["FLEET_GPU_INDEX"] == "1" and specs["wan"].gpu == "1"
    assert "CUDA_VISIBLE_DEVICES" not in specs["router"].env
    assert specs["sdxl"].env["SOMETHING"] == "passed through" and specs["sdxl"].env["PYTHONUNBUFFERED"] == "1"
    assert specs["sdxl"].env["CHAT_WORKER_URL"] == "http://c:1"  # the operator's value wins
    assert specs["sdxl"].env["MEMORY_MANAGER_URL"] == "http://127.0.0.1:7870"
    assert [s.stop_wave for s in specs.values()] == [2, 1, 0, 0, 0]  # registration stops with the workers
    assert Settings.from_env(specs["wan"].env).gpu_index == 1  # what the worker's memory client reads
    env = {**env, "QWEN_BASE_PATH": str(tmp_path), "GPU_PLACEMENT": ""}
    one_gpu = FleetSettings.from_env(env, python="/py")
    chat = next(s for s in build_specs(StartupSettings.from_env(env), one_gpu, env, gpu_count=1) if s.name == "chat")
    assert chat.command == ("/py", "-m", "workers", "chat", "--port", "7861", "--host", "0.0.0.0")  # public
    assert "CUDA_VISIBLE_DEVICES" not in chat.env and chat.env["FLEET_GPU_INDEX"] == "0"  # one GPU: shared


def test_nvidia_smi_parsing_and_startup_warnings(caplog, tmp_path: Path) -> None:
    gpus = parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 81559, 81000, 550.54\n1, NVIDIA H100, 81559, 20000, 550.54\n"
                            "garbage line\n")
    assert [(g.index, g.total_mib, g.free_mib) for g in gpus] == [(0, 81559, 81000), (1, 81559, 20000)]
    settings = StartupSettings.from_env({"SDXL_MODEL_PATH": str(tmp_path / "nope")})
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        warnings = startup_report(settings, ["sdxl"], gpus, 2)
    assert "sdxl: SDXL_MODEL_PATH does not exist on this machine" in warnings
    assert any("GPU 1: only 19.5" in w for w in warnings)
    assert any("WORKER_ADMIN_KEY" in w for w in warnings)
    assert "startup: torch" in caplog.text and "GPU 0 NVIDIA H100 80GB HBM3" in caplog.text
    assert str(tmp_path) not in " ".join(warnings)  # warnings name settings, never paths
