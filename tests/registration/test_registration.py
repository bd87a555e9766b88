"""Registration (CONTRACT §6) against the Supabase stand-in, which health-checks the registered URL."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.http import check_health
from registration.client import Registrar, Service
from registration.runner import Registrations
from registration.url import PublicUrl, public_url
from common.settings import Settings
from local.net import BackgroundServer
from local.supabase_standin import SupabaseStandin

from tests.conftest import SUPABASE_TEST_SERVICE_KEY as KEY
from tests.orchestrator.support import ROOT, fake_command, fleet_env, wait_for


class Service_:
    """A local service whose /health says 503 until ``ready`` is set."""

    def __init__(self) -> None:
        self.ready = False
        self.server = BackgroundServer(self.app)
        self.port = self.server.port

    def app(self, environ, start_response):
        start_response("200 OK" if self.ready else "503 Service Unavailable", [("Content-Type", "application/json")])
        return [json.dumps({"status": "healthy" if self.ready else "loading"}).encode()]


@pytest.fixture
def services():
    made = {"chat": Service_(), "router": Service_()}
    yield made
    for service in made.values():
        service.server.stop()


def settings(standin: SupabaseStandin, **env: str) -> Settings:
    return Settings.from_env({"SUPABASE_URL": standin.url, "SUPABASE_SERVICE_KEY": KEY, **env})


def registrations(standin, services, interval: float = 0.0, **env: str) -> Registrations:
    env = env or {"PUBLIC_BASE_URL": "http://127.0.0.1:{port}"}
    return Registrations(settings(standin, **env),
                         {Service.CHAT: services["chat"].port, Service.ROUTER: services["router"].port},
                         healthy=lambda url: check_health(url, timeout=5).ok, interval=interval,
                         retry_base=0.05, retry_max=0.2)


def test_public_url_detection() -> None:
    def url(**env: str) -> PublicUrl | None:
        return public_url(Settings.from_env(env), 7861)

    assert url(RUNPOD_POD_ID="abc123") == PublicUrl("https://abc123-7861.proxy.runpod.net", "runpod_pod_id")
    assert url(PUBLIC_BASE_URL="https://pod-{port}.example.net", RUNPOD_POD_ID="abc") == PublicUrl(
        "https://pod-7861.example.net", "public_base_url")
    assert url(PUBLIC_BASE_URL="http://10.0.0.5").url == "http://10.0.0.5:7861"
    assert url(PUBLIC_BASE_URL="http://10.0.0.5:9000/base/").url == "http://10.0.0.5:7861/base"
    assert url() is None  # off RunPod, no override: no URL, never a guess from the hostname


def test_bodies_and_headers_exactly_once_healthy(supabase_standin, services) -> None:
    regs = registrations(supabase_standin, services)
    regs.on_running("chat")
    regs.on_running("router")
    regs.on_running("sdxl")  # not a registered service: nothing happens
    time.sleep(0.5)
    assert supabase_standin.registrations == []  # /health still 503: nothing sent
    services["chat"].ready = services["router"].ready = True
    wait_for(lambda: len(supabase_standin.registrations) == 2, what="two registrations")
    by_function = {r.function: r for r in supabase_standin.registrations}
    chat, router = by_function["register-chat-worker"], by_function["update-worker-url"]
    chat_url = f"http://127.0.0.1:{services['chat'].port}"
    router_url = f"http://127.0.0.1:{services['router'].port}"
    assert chat.body == {"worker_url": chat_url, "auto_registered": True} and chat.accepted
    assert router.body == {"worker_url": router_url, "auto_registered": True, "registration_method": "startup",
                           "detection_method": "public_base_url"} and router.accepted
    for reg in (chat, router):
        assert reg.headers["authorization"] == f"Bearer {KEY}" and reg.headers["apikey"] == KEY
        assert reg.headers["content-type"] == "application/json"
    regs.stop()


def test_retries_with_backoff_until_the_function_accepts(supabase_standin, services) -> None:
    services["router"].ready = True
    supabase_standin.set_down(True)  # every call answered 503
    regs = registrations(supabase_standin, services)
    regs.on_running("router")
    time.sleep(0.6)
    assert supabase_standin.registrations == []
    supabase_standin.set_down(False)
    wait_for(lambda: supabase_standin.registrations, what="registration after the outage")
    assert regs.loop(Service.ROUTER).registrations == 1
    regs.stop()


def test_refused_registration_is_retried_with_growing_delays(supabase_standin, services) -> None:
    services["chat"].ready = True
    # the function health-checks the *public* URL; the stand-in refuses (400) anything not on loopback
    regs = registrations(supabase_standin, services, PUBLIC_BASE_URL="https://pod-{port}.example.net")
    regs.on_running("chat")
    wait_for(lambda: len(supabase_standin.registrations) >= 4, what="four attempts")
    regs.stop()
    attempts = supabase_standin.registrations
    assert not any(r.accepted for r in attempts)
    assert attempts[0].body["worker_url"] == f"https://pod-{services['chat'].port}.example.net"
    gaps = [b.at - a.at for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.04 and gaps[1] >= 0.09 and gaps[2] >= 0.18  # 0.05, 0.1, 0.2 s (capped at 0.2)


def test_heartbeat_restart_and_stop(supabase_standin, services) -> None:
    services["router"].ready = True
    regs = registrations(supabase_standin, services, interval=0.3)
    regs.on_running("router")
    wait_for(lambda: len(supabase_standin.registrations) >= 3, what="heartbeats")
    methods = [r.body["registration_method"] for r in supabase_standin.registrations]
    assert methods[:3] == ["startup", "heartbeat", "heartbeat"]
    regs.on_running("router")  # the router restarted: register again at once
    wait_for(lambda: "restart" in [r.body["registration_method"] for r in supabase_standin.registrations],
             what="re-registration after a restart")
    regs.stop()
    count = len(supabase_standin.registrations)
    time.sleep(0.7)
    assert len(supabase_standin.registrations) == count  # heartbeat stopped


def test_nothing_is_sent_off_runpod_without_an_override(supabase_standin, services) -> None:
    services["chat"].ready = services["router"].ready = True
    regs = registrations(supabase_standin, services, RUNPOD_POD_ID="")
    assert "PUBLIC_BASE_URL" in (regs.disabled_reason or "")
    regs.on_running("chat")
    regs.on_running("router")
    time.sleep(0.5)
    assert supabase_standin.registrations == [] and regs.loop(Service.CHAT) is None


def test_one_failed_attempt_reports_status_without_the_key(supabase_standin, services) -> None:
    registrar = Registrar(supabase_standin.url, settings(supabase_standin).supabase_service_key)
    outcome = registrar.register(Service.CHAT, PublicUrl("http://127.0.0.1:1", "public_base_url"), "startup")
    assert not outcome.ok and "HTTP 400" in outcome.detail and KEY not in outcome.detail


def test_orchestrator_registers_chat_once_it_is_running(supabase_standin, tmp_path: Path) -> None:
    from local.net import free_port

    ports = {n: free_port() for n in ("memory_manager", "router", "sdxl", "chat", "wan", "status")}
    events = tmp_path / "events.jsonl"
    env = fleet_env(ports, tmp_path, FLEET_PROGRAMS="chat", QWEN_INSTRUCT_PATH=str(tmp_path),
                    FLEET_COMMAND_CHAT=" ".join(fake_command("chat", events, "--ready-after", "0.5")),
                    SUPABASE_URL=supabase_standin.url, SUPABASE_SERVICE_KEY=KEY,
                    PUBLIC_BASE_URL="http://127.0.0.1:{port}", FLEET_STOP_GRACE_SECONDS="5")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: supabase_standin.registrations, timeout=20, what="chat registered")
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    (reg,) = supabase_standin.registrations
    assert reg.function == "register-chat-worker" and reg.accepted
    assert reg.body == {"worker_url": f"http://127.0.0.1:{ports['chat']}", "auto_registered": True}
    assert "chat: register-chat-worker: registered" in output and KEY not in output
