"""The registration loops (CONTRACT §6) in-process, against the Supabase stand-in, which health-checks the
registered URL: what is sent, when, how failures are retried, how a restart is noticed from health alone."""
from __future__ import annotations

import time

from common.http import check_health
from local.supabase_standin import SupabaseStandin
from registration.client import Registrar, Service
from registration.config import RegistrationSettings
from registration.registrations import Registrations
from registration.url import PublicUrl, public_url
from tests.conftest import SUPABASE_TEST_SERVICE_KEY as KEY
from tests.orchestrator.support import wait_for

from .support import methods


def settings(standin: SupabaseStandin, **env: str) -> RegistrationSettings:
    return RegistrationSettings.from_env({"SUPABASE_URL": standin.url, "SUPABASE_SERVICE_KEY": KEY, **env})


def registrations(standin, services, interval: float = 0.0, healthy=None, **env: str) -> Registrations:
    env = env or {"PUBLIC_BASE_URL": "http://127.0.0.1:{port}"}
    return Registrations(settings(standin, **env),
                         {Service.CHAT: services["chat"].port, Service.ROUTER: services["router"].port},
                         healthy=healthy or (lambda url: check_health(url, timeout=5).ok), interval=interval,
                         retry_base=0.05, retry_max=0.2, health_poll=0.05)


def test_public_url_detection() -> None:
    def url(**env: str) -> PublicUrl | None:
        return public_url(RegistrationSettings.from_env(env), 7861)

    assert url(RUNPOD_POD_ID="abc123") == PublicUrl("https://abc123-7861.proxy.runpod.net", "runpod_pod_id")
    assert url(PUBLIC_BASE_URL="https://pod-{port}.example.net", RUNPOD_POD_ID="abc") == PublicUrl(
        "https://pod-7861.example.net", "public_base_url")
    assert url(PUBLIC_BASE_URL="http://10.0.0.5").url == "http://10.0.0.5:7861"
    assert url(PUBLIC_BASE_URL="http://10.0.0.5:9000/base/").url == "http://10.0.0.5:7861/base"
    assert url() is None  # off RunPod, no override: no URL, never a guess from the hostname


def test_bodies_and_headers_exactly_once_healthy(supabase_standin, services) -> None:
    regs = registrations(supabase_standin, services)
    regs.start()
    time.sleep(0.5)
    assert supabase_standin.registrations == []  # /health still 503: nothing sent
    assert regs.health()[0]  # waiting is healthy
    services["chat"].ready = services["router"].ready = True
    wait_for(lambda: len(supabase_standin.registrations) == 2, what="two registrations")
    by_function = {r.function: r for r in supabase_standin.registrations}
    chat, router = by_function["register-chat-worker"], by_function["update-worker-url"]
    assert chat.body == {"worker_url": services["chat"].url, "auto_registered": True} and chat.accepted
    assert router.body == {"worker_url": services["router"].url, "auto_registered": True,
                           "registration_method": "startup", "detection_method": "public_base_url"}
    assert router.accepted
    for reg in (chat, router):
        assert reg.headers["authorization"] == f"Bearer {KEY}" and reg.headers["apikey"] == KEY
        assert reg.headers["content-type"] == "application/json"
    ready, details = regs.health()
    assert ready and details["services"]["chat"]["registrations"] == 1
    assert details["services"]["router"]["url"] == services["router"].url and KEY not in str(details)
    time.sleep(0.3)
    assert len(supabase_standin.registrations) == 2  # interval 0: no heartbeat while health holds
    regs.stop()


def test_retries_with_backoff_until_the_function_accepts(supabase_standin, services) -> None:
    services["router"].ready = True
    supabase_standin.set_down(True)  # every call answered 503
    regs = registrations(supabase_standin, services)
    regs.start()
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
    regs.start()
    wait_for(lambda: len(supabase_standin.registrations) >= 4, what="four attempts")
    regs.stop()
    attempts = supabase_standin.registrations
    assert not any(r.accepted for r in attempts)
    assert attempts[0].body["worker_url"] == f"https://pod-{services['chat'].port}.example.net"
    gaps = [b.at - a.at for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.04 and gaps[1] >= 0.09 and gaps[2] >= 0.18  # 0.05, 0.1, 0.2 s (capped at 0.2)
    assert "HTTP 400" in regs.health()[1]["services"]["chat"]["last"]


def test_heartbeat_restart_after_a_health_outage_and_stop(supabase_standin, services) -> None:
    services["router"].ready = True
    regs = registrations(supabase_standin, services, interval=0.3)
    regs.start()
    wait_for(lambda: len(methods(supabase_standin)) >= 3, what="heartbeats")
    assert methods(supabase_standin)[:3] == ["startup", "heartbeat", "heartbeat"]
    services["router"].ready = False  # the router went away (a crash, a restart) ...
    time.sleep(0.5)
    count = len(methods(supabase_standin))
    assert methods(supabase_standin)[-1] == "heartbeat"  # nothing but heartbeats while it was up
    services["router"].ready = True  # ... and came back: register again at once, as a restart
    wait_for(lambda: "restart" in methods(supabase_standin), what="re-registration after the outage")
    assert methods(supabase_standin)[count] == "restart"
    wait_for(lambda: methods(supabase_standin)[-1] == "heartbeat", what="heartbeats again")
    regs.stop()
    count = len(supabase_standin.registrations)
    time.sleep(0.7)
    assert len(supabase_standin.registrations) == count  # heartbeat stopped


def test_nothing_is_sent_off_runpod_without_an_override(supabase_standin, services) -> None:
    services["chat"].ready = services["router"].ready = True
    regs = registrations(supabase_standin, services, RUNPOD_POD_ID="")
    assert "PUBLIC_BASE_URL" in (regs.disabled_reason or "")
    regs.start()
    time.sleep(0.5)
    assert supabase_standin.registrations == [] and regs.loop(Service.CHAT) is None
    assert regs.health() == (True, {"registering": False, "reason": regs.disabled_reason})


def test_a_loop_that_dies_makes_health_fail(supabase_standin, services) -> None:
    def broken(url: str) -> bool:
        raise RuntimeError("a bug in the health check")

    regs = registrations(supabase_standin, services, healthy=broken)
    regs.start()
    wait_for(lambda: not regs.health()[0], what="/health failing once the loops died")
    assert supabase_standin.registrations == []


def test_one_failed_attempt_reports_status_without_the_key(supabase_standin) -> None:
    registrar = Registrar(supabase_standin.url, settings(supabase_standin).supabase_service_key)
    outcome = registrar.register(Service.CHAT, PublicUrl("http://127.0.0.1:1", "public_base_url"), "startup")
    assert not outcome.ok and "HTTP 400" in outcome.detail and KEY not in outcome.detail
