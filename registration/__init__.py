"""Worker registration with the app (CONTRACT §6): public-URL detection, the register calls, the heartbeat.

The orchestrator runs one :class:`~registration.heartbeat.RegistrationLoop` thread per registered service
(chat on its port, the router on its port), started when that program first becomes RUNNING.
"""
