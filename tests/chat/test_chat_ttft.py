"""The engine's time to first token (what the router's ops page shows): counted once per request, at the round
that chose its first token, as the wait from submission."""
from __future__ import annotations


def test_each_request_counts_one_first_token_and_its_wait(served, handler):
    before = handler.engine.stats()
    replies = [served.post("/chat", {"messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 6}).json()
               for i in range(3)]
    after = handler.engine.stats()
    assert all(r["success"] for r in replies)
    assert after["first_tokens"] - before["first_tokens"] == 3
    mean_ttft = (after["ttft_seconds_total"] - before["ttft_seconds_total"]) / 3
    assert 0 < mean_ttft <= max(r["generation_time"] for r in replies)
