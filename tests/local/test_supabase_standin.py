"""The Supabase stand-in: signed callbacks, failure controls, storage rules, registration, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

import pytest
import requests

from local.net import BackgroundServer, free_port
from local.supabase_standin import SupabaseStandin, is_loopback_url, sign

KEY = "test-service-key"
SECRET = "test-callback-secret"


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "apikey": key}


def send_callback(standin: SupabaseStandin, body: Any, *, secret: str = SECRET,
                  headers: dict[str, str] | None = None, timeout: float = 10) -> requests.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", "X-Callback-Signature": sign(raw, secret), **auth()}
    hdrs.update(headers or {})
    hdrs = {k: v for k, v in hdrs.items() if v is not None}
    return requests.post(standin.url + "/functions/v1/job-callback", data=raw, headers=hdrs, timeout=timeout)


def upload(standin: SupabaseStandin, path: str, data: bytes, content_type: str | None,
           upsert: bool = True) -> requests.Response:
    headers = {**auth(), **({"Content-Type": content_type} if content_type else {})}
    if upsert:
        headers["x-upsert"] = "true"
    return requests.post(f"{standin.url}/storage/v1/object/{path}", data=data, headers=headers, timeout=10)


# ----------------------------------------------------------------------------- callbacks
def test_signed_callback_recorded_byte_exact(supabase_standin: SupabaseStandin) -> None:
    raw = b'{"job_id": "j1", "status": "completed",  "assets": [], "metadata": {"seed": 0}}'
    resp = send_callback(supabase_standin, raw)
    assert resp.status_code == 200 and resp.json() == {"success": True}
    (cb,) = supabase_standin.callbacks()
    assert cb.raw == raw and cb.body["metadata"] == {"seed": 0}
    assert (cb.job_id, cb.status, cb.skipped) == ("j1", "completed", False)
    assert cb.headers["x-callback-signature"] == sign(raw, SECRET)
    assert cb.headers["apikey"] == KEY
    assert supabase_standin.wait_for("j1", timeout=1) is cb


def test_signature_must_match_exact_bytes(supabase_standin: SupabaseStandin) -> None:
    raw = json.dumps({"job_id": "j1", "status": "completed"}).encode()
    wrong_key = send_callback(supabase_standin, raw, secret="other")
    reserialised = send_callback(supabase_standin, raw, headers={"X-Callback-Signature": sign(raw + b" ", SECRET)})
    missing = send_callback(supabase_standin, raw, headers={"X-Callback-Signature": None})
    uppercase = send_callback(supabase_standin, raw, headers={"X-Callback-Signature": sign(raw, SECRET).upper()})
    for resp in (wrong_key, reserialised, missing, uppercase):
        assert resp.status_code == 401 and resp.json() == {"error": "invalid signature"}
    assert supabase_standin.callbacks() == []


@pytest.mark.parametrize(
    "headers", [{"apikey": None}, {"Authorization": None}, {"apikey": "wrong"}, {"Authorization": "Bearer wrong"}]
)
def test_gateway_auth_required(supabase_standin: SupabaseStandin, headers: dict[str, str | None]) -> None:
    resp = send_callback(supabase_standin, {"job_id": "j1", "status": "completed"}, headers=headers)
    assert resp.status_code == 401
    assert supabase_standin.callbacks() == []


def test_fail_next_then_recovers(supabase_standin: SupabaseStandin) -> None:
    supabase_standin.fail_next(2, status=502)
    codes = [send_callback(supabase_standin, {"job_id": "j", "status": "completed"}).status_code for _ in range(3)]
    assert codes == [502, 502, 200]
    assert len(supabase_standin.callbacks("j")) == 1
    assert supabase_standin.callback_attempts == 3


def test_set_down_answers_503_to_everything(supabase_standin: SupabaseStandin) -> None:
    supabase_standin.set_down(True)
    assert send_callback(supabase_standin, {"job_id": "j", "status": "failed"}).status_code == 503
    assert upload(supabase_standin, "b/p.png", b"x", "image/png").status_code == 503
    supabase_standin.set_down(False)
    assert send_callback(supabase_standin, {"job_id": "j", "status": "failed"}).status_code == 200
    assert supabase_standin.callbacks(status="failed")[0].job_id == "j"


def test_skip_job_ids(supabase_standin: SupabaseStandin) -> None:
    supabase_standin.skip_job_ids.add("cancelled-job")
    resp = send_callback(supabase_standin, {"job_id": "cancelled-job", "status": "completed"})
    assert resp.json() == {"success": True, "skipped": True}
    assert supabase_standin.callbacks("cancelled-job")[0].skipped


def test_delay_simulates_a_slow_function(supabase_standin: SupabaseStandin) -> None:
    supabase_standin.delay = 0.5
    with pytest.raises(requests.Timeout):
        send_callback(supabase_standin, {"job_id": "slow", "status": "completed"}, timeout=0.1)


def test_wait_for_blocks_until_arrival_and_times_out(supabase_standin: SupabaseStandin) -> None:
    timer = threading.Timer(0.2, send_callback, (supabase_standin, {"job_id": "later", "status": "completed"}))
    timer.start()
    assert supabase_standin.wait_for(lambda cb: cb.job_id == "later", timeout=5).status == "completed"
    timer.join()
    send_callback(supabase_standin, {"job_id": "p", "status": "processing"})
    assert supabase_standin.wait_for("p", status=None, timeout=1).status == "processing"
    with pytest.raises(TimeoutError):
        supabase_standin.wait_for("p", timeout=0.2)  # "completed" never came


# ----------------------------------------------------------------------------- storage
def test_storage_upload_rules(supabase_standin: SupabaseStandin) -> None:
    path = "workspace-temp/user-1/job-1/0.png"
    assert upload(supabase_standin, path, b"png", "application/octet-stream").status_code == 400
    assert upload(supabase_standin, path, b"png", None).status_code == 400
    ok = upload(supabase_standin, path, b"png-1", "image/png")
    assert ok.status_code == 200 and ok.json()["Key"] == path
    duplicate = upload(supabase_standin, path, b"png-2", "image/png", upsert=False)
    assert duplicate.status_code == 409
    assert upload(supabase_standin, path, b"png-3", "image/png").status_code == 200
    assert supabase_standin.objects[path] == (b"png-3", "image/png")
    got = requests.get(f"{supabase_standin.url}/storage/v1/object/{path}", headers=auth(), timeout=10)
    assert got.content == b"png-3" and got.headers["Content-Type"] == "image/png"


def test_storage_auth_and_injected_failures(supabase_standin: SupabaseStandin) -> None:
    resp = requests.post(f"{supabase_standin.url}/storage/v1/object/b/x.png", data=b"x",
                         headers={"Content-Type": "image/png", "Authorization": f"Bearer {KEY}"}, timeout=10)
    assert resp.status_code == 401
    supabase_standin.fail_storage_next(1)
    assert upload(supabase_standin, "b/x.png", b"x", "image/png").status_code == 500
    assert upload(supabase_standin, "b/x.png", b"x", "image/png").status_code == 200
    assert list(supabase_standin.objects) == ["b/x.png"]


def test_storage_outage_window_refuses_every_upload_until_ended(supabase_standin: SupabaseStandin) -> None:
    supabase_standin.set_storage_failing(500)
    assert [upload(supabase_standin, f"b/{n}.png", b"x", "image/png").status_code for n in range(3)] == [500] * 3
    assert supabase_standin.objects == {}
    callback = json.dumps({"job_id": "j-1", "status": "completed"}).encode()
    assert send_callback(supabase_standin, callback).status_code == 200  # callbacks are not part of the window
    supabase_standin.set_storage_failing(None)
    assert upload(supabase_standin, "b/3.png", b"x", "image/png").status_code == 200
    assert list(supabase_standin.objects) == ["b/3.png"]
    assert (supabase_standin.storage_attempts, supabase_standin.storage_refused) == (4, 3)


# ----------------------------------------------------------------------------- registration
@pytest.fixture
def healthy_worker() -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list:
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"status": "healthy"}']

    server = BackgroundServer(app)
    yield server
    server.stop()


@pytest.mark.parametrize("function", ["register-chat-worker", "update-worker-url"])
def test_registration_with_loopback_health_check(supabase_standin: SupabaseStandin, healthy_worker: BackgroundServer,
                                                 function: str) -> None:
    body = {"worker_url": healthy_worker.url, "auto_registered": True}
    resp = requests.post(f"{supabase_standin.url}/functions/v1/{function}", json=body, headers=auth(), timeout=10)
    assert resp.status_code == 200 and resp.json()["success"] is True
    (reg,) = supabase_standin.registrations
    assert (reg.function, reg.body, reg.accepted) == (function, body, True)
    assert reg.headers["apikey"] == KEY


def test_registration_refused_when_unhealthy_or_not_loopback(supabase_standin: SupabaseStandin) -> None:
    for url in ("https://pod-7861.proxy.runpod.net", f"http://127.0.0.1:{free_port()}", ""):
        resp = requests.post(f"{supabase_standin.url}/functions/v1/register-chat-worker",
                             json={"worker_url": url}, headers=auth(), timeout=10)
        assert resp.status_code == 400 and resp.json()["success"] is False
    assert [r.accepted for r in supabase_standin.registrations] == [False, False, False]
    unauth = requests.post(f"{supabase_standin.url}/functions/v1/update-worker-url", json={}, timeout=10)
    assert unauth.status_code == 401


def test_is_loopback_url() -> None:
    assert is_loopback_url("http://127.0.0.1:7861") and is_loopback_url("http://localhost:1/x")
    assert is_loopback_url("http://[::1]:7860")
    assert not is_loopback_url("http://10.0.0.1:7860") and not is_loopback_url("ftp://127.0.0.1/")
    assert not is_loopback_url("http://169.254.169.254/") and not is_loopback_url("http://127.0.0.1.nip.io/")


# ----------------------------------------------------------------------------- CLI
def test_cli_prints_each_callback_as_a_json_line() -> None:
    command = [sys.executable, "-m", "local.supabase_standin", "--port", "0",
               "--service-key", KEY, "--callback-secret", SECRET]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stderr is not None and proc.stdout is not None
            url = proc.stderr.readline().strip().rsplit(" ", 1)[-1]
            assert url.startswith("http://127.0.0.1:")
            body = {"job_id": "cli", "status": "completed", "assets": []}
            raw = json.dumps(body, indent=2).encode()  # multi-line on the wire, one line on stdout
            resp = requests.post(url + "/functions/v1/job-callback", data=raw, timeout=10,
                                 headers={"X-Callback-Signature": sign(raw, SECRET), **auth()})
            assert resp.status_code == 200
            assert json.loads(proc.stdout.readline()) == body
        finally:
            proc.terminate()
            assert proc.wait(timeout=10) == 0
