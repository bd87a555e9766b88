"""Local stand-ins for the fleet's external services, used by tests and the local demo.

Everything here listens on loopback only (127.0.0.1) and never contacts anything else:

- :class:`~local.redis_server.RedisServer`: Debian's real ``redis-server`` on a free port.
- :class:`~local.upstash_front.UpstashFront`: an Upstash-REST-compatible HTTP front over that Redis,
  so the official ``upstash_redis`` SDK (and the app's raw REST calls) run against real Redis semantics.
- :class:`~local.supabase_standin.SupabaseStandin`: the Supabase endpoints the workers call
  (``job-callback``, Storage uploads, worker registration), with controls to inject failures.
"""
