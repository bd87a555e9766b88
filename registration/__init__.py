"""Worker registration with the app (CONTRACT §6): public-URL detection, the register calls, the heartbeat.

``python -m registration`` (see ``registration/__main__.py``) is a program of the fleet: it runs one
:class:`~registration.heartbeat.RegistrationLoop` thread per registered service (chat and the router on their
ports), each of which waits for that service's local ``/health`` and watches it for restarts.
"""
