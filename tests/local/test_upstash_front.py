"""The Upstash-REST front: raw HTTP in all three forms, and the official upstash_redis SDK."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import redis
import requests
from upstash_redis import Redis as UpstashRedis
from upstash_redis.errors import UpstashError

from local.redis_server import RedisServer
from local.upstash_front import UpstashFront


@pytest.fixture
def http(upstash_front: UpstashFront, redis_client: redis.Redis) -> Http:
    return Http(upstash_front)


class Http:
    """Thin raw-HTTP client for the front, as the app's edge functions call it."""

    def __init__(self, front: UpstashFront) -> None:
        self.url = front.url
        self.headers: dict[str, str] = {"Authorization": f"Bearer {front.token}"}

    def post(self, path: str = "", body: Any = None, *, data: Any = None, b64: bool = False) -> requests.Response:
        headers = dict(self.headers, **({"Upstash-Encoding": "base64"} if b64 else {}))
        return requests.post(self.url + path, json=body, data=data, headers=headers, timeout=10)

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers, timeout=10)


@pytest.fixture
def sdk(upstash_front: UpstashFront, redis_client: redis.Redis) -> UpstashRedis:
    return UpstashRedis(upstash_front.url, upstash_front.token, rest_retries=0, allow_telemetry=False)


# ----------------------------------------------------------------------------- raw HTTP
def test_json_body_command_and_reply_types(http: Http, redis_client: redis.Redis) -> None:
    assert http.post("", ["LPUSH", "k", "v1", "v2"]).json() == {"result": 2}
    assert http.post("", ["LRANGE", "k", 0, -1]).json() == {"result": ["v2", "v1"]}
    assert http.post("", ["SET", "s", "hello"]).json() == {"result": "OK"}
    assert http.post("", ["GET", "nothing"]).json() == {"result": None}
    assert http.post("", ["INCRBY", "n", 5]).json() == {"result": 5}
    assert redis_client.lrange("k", 0, -1) == [b"v2", b"v1"]


def test_path_form_get_and_percent_decoding(http: Http, redis_client: redis.Redis) -> None:
    assert http.get("/set/a%2Fb/hello%20world/EX/100").json() == {"result": "OK"}
    assert redis_client.get("a/b") == b"hello world"
    assert 0 < redis_client.ttl("a/b") <= 100
    assert http.get("/get/a%2Fb").json() == {"result": "hello world"}
    assert http.get("/llen/sdxl_queue").json() == {"result": 0}


def test_path_form_post_body_is_stored_verbatim(http: Http, redis_client: redis.Redis) -> None:
    body = '["{\\"id\\":\\"x\\"}"]'  # what the app's producer POSTs to /rpush/<queue>
    assert http.post("/rpush/q", data=body).json() == {"result": 1}
    assert redis_client.lrange("q", 0, -1) == [body.encode()]
    assert json.loads(json.loads(redis_client.lindex("q", 0))[0]) == {"id": "x"}


def test_path_form_post_query_parameters_follow_the_body(http: Http, redis_client: redis.Redis) -> None:
    assert http.post("/set/k?EX=100", data=b"\x00binary\xff").json() == {"result": "OK"}
    assert redis_client.get("k") == b"\x00binary\xff"
    assert 0 < redis_client.ttl("k") <= 100


def test_pipeline_mixes_results_and_errors(http: Http) -> None:
    http.post("", ["SET", "str", "x"])
    replies = http.post("/pipeline", [["INCR", "c"], ["HGET", "str", "f"], ["BLPOP", "q", 0], ["INCR", "c"]])
    assert replies.status_code == 200
    body = replies.json()
    assert body[0] == {"result": 1} and body[3] == {"result": 2}
    assert body[1]["error"].startswith("WRONGTYPE")
    assert "blocking" in body[2]["error"]


def test_multi_exec_is_a_transaction(http: Http, redis_client: redis.Redis) -> None:
    assert http.post("/multi-exec", [["INCR", "c"], ["SET", "s", "v"]]).json() == [{"result": 1}, {"result": "OK"}]
    aborted = http.post("/multi-exec", [["INCR", "c"], ["NOSUCHCOMMAND"]])
    assert aborted.status_code == 400 and "EXECABORT" in aborted.json()["error"]
    assert redis_client.get("c") == b"1"


def test_base64_encoding_encodes_every_string_but_ok(http: Http) -> None:
    assert http.post("", ["SET", "k", "OK"], b64=True).json() == {"result": "OK"}
    assert http.post("", ["GET", "k"], b64=True).json() == {"result": base64.b64encode(b"OK").decode()}
    http.post("", ["RPUSH", "l", "a", "é"])
    assert http.post("", ["LRANGE", "l", 0, -1], b64=True).json() == {
        "result": [base64.b64encode(b"a").decode(), base64.b64encode("é".encode()).decode()]
    }
    assert http.post("", ["LLEN", "l"], b64=True).json() == {"result": 2}
    assert http.post("", ["GET", "none"], b64=True).json() == {"result": None}
    assert http.post("", ["PING"], b64=True).json() == {"result": base64.b64encode(b"PONG").decode()}


@pytest.mark.parametrize(
    "headers, query",
    [({}, ""), ({"Authorization": "Bearer wrong"}, ""), ({"Authorization": "Basic x"}, ""), ({}, "?_token=wrong")],
)
def test_auth_refused(upstash_front: UpstashFront, headers: dict[str, str], query: str) -> None:
    for resp in (
        requests.post(upstash_front.url + "/" + query, json=["PING"], headers=headers, timeout=10),
        requests.get(upstash_front.url + "/ping" + query, headers=headers, timeout=10),
    ):
        assert resp.status_code == 401 and resp.json() == {"error": "Unauthorized"}


def test_token_query_parameter_accepted(upstash_front: UpstashFront) -> None:
    resp = requests.get(f"{upstash_front.url}/echo/hi?_token={upstash_front.token}", timeout=10)
    assert resp.json() == {"result": "hi"}


@pytest.mark.parametrize(
    "command",
    [
        ["BLPOP", "q", "0"],
        ["BRPOP", "q", "1"],
        ["BLMOVE", "a", "b", "LEFT", "RIGHT", "0"],
        ["BRPOPLPUSH", "a", "b", "0"],
        ["BZPOPMIN", "z", "0"],
        ["XREAD", "BLOCK", "0", "STREAMS", "s", "$"],
        ["SUBSCRIBE", "ch"],
        ["MONITOR"],
    ],
)
def test_blocking_commands_refused(http: Http, command: list) -> None:
    resp = http.post("", command)
    assert resp.status_code == 400
    assert resp.json()["error"].startswith("ERR blocking command")


def test_xread_without_block_is_allowed(http: Http) -> None:
    assert http.post("", ["XREAD", "COUNT", 1, "STREAMS", "s", "0"]).json() == {"result": None}


@pytest.mark.parametrize(
    "command, fragment",
    [(["NOSUCHCOMMAND", "x"], "ERR unknown command"), (["GET"], "ERR wrong number of arguments"),
     (["MULTI"], "not supported"), ([], "non-empty JSON array")],
)
def test_errors_are_400_with_redis_text(http: Http, command: list, fragment: str) -> None:
    resp = http.post("", command)
    assert resp.status_code == 400 and fragment in resp.json()["error"]


def test_wrongtype_and_bad_json_are_400(http: Http) -> None:
    http.post("", ["SET", "s", "x"])
    assert http.post("", ["LPUSH", "s", "x"]).json()["error"].startswith("WRONGTYPE")
    bad = http.post("", data="not json")
    assert bad.status_code == 400 and bad.json()["error"].startswith("ERR")


def test_eval_and_script_load(http: Http) -> None:
    script = "redis.call('SET', KEYS[1], ARGV[1]); return {redis.call('GET', KEYS[1]), 7}"
    assert http.post("", ["EVAL", script, 1, "k", "v"]).json() == {"result": ["v", 7]}
    sha = http.post("", ["SCRIPT", "LOAD", "return ARGV[1]"]).json()["result"]
    assert http.post("", ["EVALSHA", sha, 0, "hi"]).json() == {"result": "hi"}
    assert http.post("", ["EVALSHA", "0" * 40, 0]).json()["error"].startswith("NOSCRIPT")


# ----------------------------------------------------------------------------- official SDK
def test_sdk_list_queue_operations(sdk: UpstashRedis, redis_client: redis.Redis) -> None:
    assert sdk.rpush("sdxl_queue", '{"id": "1"}', '{"id": "2"}') == 2
    assert sdk.lpush("sdxl_queue", '{"id": "0"}') == 3
    assert sdk.lmove("sdxl_queue", "sdxl_queue:processing:w1", "LEFT", "RIGHT") == '{"id": "0"}'
    assert sdk.llen("sdxl_queue") == 2
    assert sdk.lrem("sdxl_queue:processing:w1", 1, '{"id": "0"}') == 1
    assert sdk.lmove("empty", "elsewhere", "LEFT", "RIGHT") is None
    assert redis_client.lrange("sdxl_queue", 0, -1) == [b'{"id": "1"}', b'{"id": "2"}']


def test_sdk_strings_hashes_and_eval(sdk: UpstashRedis, redis_client: redis.Redis) -> None:
    assert sdk.set("hb:w1", "alive", ex=30) is True
    assert sdk.get("hb:w1") == "alive"
    assert 0 < redis_client.ttl("hb:w1") <= 30
    assert sdk.set("hb:w1", "x", nx=True) is False
    assert sdk.get("missing") is None
    assert sdk.hincrby("attempts", "job-1", 1) == 1
    assert sdk.hincrby("attempts", "job-1", 2) == 3
    assert sdk.eval("return {KEYS[1], ARGV[1], 42}", ["k"], ["é"]) == ["k", "é", 42]
    sha = sdk.script_load("return redis.call('INCR', KEYS[1])")
    assert sdk.evalsha(sha, ["n"]) == 1


def test_sdk_pipeline_and_transaction(sdk: UpstashRedis) -> None:
    pipe = sdk.pipeline()
    pipe.incr("c")
    pipe.set("s", "v")
    pipe.get("s")
    assert pipe.exec() == [1, True, "v"]  # the SDK maps SET's "OK" to True
    tx = sdk.multi()
    tx.incr("c")
    tx.get("s")
    assert tx.exec() == [2, "v"]


def test_sdk_without_base64_encoding(upstash_front: UpstashFront, redis_client: redis.Redis) -> None:
    plain = UpstashRedis(upstash_front.url, upstash_front.token, rest_encoding=None, rest_retries=0)
    plain.rpush("q", "ü")
    assert plain.lrange("q", 0, -1) == ["ü"]


def test_sdk_errors_and_auth(sdk: UpstashRedis, upstash_front: UpstashFront) -> None:
    sdk.set("s", "x")
    with pytest.raises(UpstashError, match="WRONGTYPE"):
        sdk.lpush("s", "v")
    bad = UpstashRedis(upstash_front.url, "wrong-token", rest_retries=0)
    with pytest.raises(UpstashError, match="Unauthorized"):
        bad.get("s")


def test_redis_outage_is_503_then_recovers_after_restart() -> None:
    with RedisServer(persistence=True) as server, UpstashFront(server.url, "t") as front:
        headers = {"Authorization": "Bearer t"}
        assert requests.post(front.url, json=["RPUSH", "q", "a"], headers=headers, timeout=10).json() == {"result": 1}
        server.kill()
        down = requests.post(front.url, json=["LLEN", "q"], headers=headers, timeout=10)
        assert down.status_code == 503 and "error" in down.json()
        server.restart()
        assert requests.post(front.url, json=["LLEN", "q"], headers=headers, timeout=10).json() == {"result": 1}


# ----------------------------------------------------------------------------- fault modes
@pytest.fixture
def faulty_front(redis_server: RedisServer, redis_client: redis.Redis):
    front = UpstashFront(redis_server.url, "fault-token", fault_seed=7)
    yield front
    front.stop()


def rest_client(front: UpstashFront, timeout: float = 5.0):
    from workers.core.transport import UpstashRestTransport  # the client the workers use
    return UpstashRestTransport(front.url, front.token, timeout)


def test_fault_drop_runs_nothing_and_the_client_sees_an_error(faulty_front, redis_client) -> None:
    from workers.core.transport import TransportError
    faulty_front.faults.set(drop=1.0)
    with pytest.raises(TransportError):
        rest_client(faulty_front).command("RPUSH", "q", "a")
    assert redis_client.llen("q") == 0
    assert faulty_front.faults.snapshot() == {"requests": 1, "drop": 1}


def test_fault_lose_runs_the_command_then_hangs_up(faulty_front, redis_client) -> None:
    from workers.core.transport import TransportError
    faulty_front.faults.set(lose=1.0)
    with pytest.raises(TransportError):
        rest_client(faulty_front).command("RPUSH", "q", "a")
    assert redis_client.lrange("q", 0, -1) == [b"a"]
    sdk = UpstashRedis(faulty_front.url, faulty_front.token, rest_retries=0, allow_telemetry=False)
    pipe = sdk.pipeline()
    pipe.rpush("q", "b")
    pipe.rpush("q", "c")
    with pytest.raises(Exception):
        pipe.exec()
    assert redis_client.lrange("q", 0, -1) == [b"a", b"b", b"c"]
    assert faulty_front.faults.snapshot()["lose"] == 2


def test_fault_hold_answers_after_the_client_timed_out(faulty_front, redis_client) -> None:
    from workers.core.transport import TransportError
    faulty_front.faults.set(hold=1.0, hold_seconds=1.5)
    with pytest.raises(TransportError, match="Timeout"):
        rest_client(faulty_front, timeout=0.5).command("RPUSH", "q", "a")
    assert redis_client.lrange("q", 0, -1) == [b"a"]
    assert rest_client(faulty_front, timeout=5.0).command("LLEN", "q") == 1  # a patient client gets its answer


def test_faults_are_seeded_switchable_and_off_by_default(faulty_front, redis_client) -> None:
    from local.upstash_front import Faults
    client = rest_client(faulty_front)
    assert [client.command("INCR", "n") for _ in range(3)] == [1, 2, 3]
    assert faulty_front.faults.snapshot() == {"requests": 3}
    one, two = Faults(seed=42), Faults(seed=42)
    for faults in (one, two):
        faults.set(drop=0.2, lose=0.2, hold=0.2)
    draws = [one.draw()[0] for _ in range(200)]
    assert draws == [two.draw()[0] for _ in range(200)]
    assert {None, "drop", "lose", "hold"} == set(draws)
    one.off()
    assert {one.draw()[0] for _ in range(50)} == {None}
    with pytest.raises(ValueError):
        one.set(drop=0.7, lose=0.7)
