"""The public URL of a service on this pod (CONTRACT §6).

- ``PUBLIC_BASE_URL`` set: ``{port}`` in it is replaced by the service's port
  (``https://abc-{port}.proxy.example.net`` → ``https://abc-7861.proxy.example.net``); without ``{port}``
  the port is put on the host (``http://10.0.0.5`` → ``http://10.0.0.5:7861``; a port already there is
  replaced). Detection method ``public_base_url``.
- Else ``RUNPOD_POD_ID`` set: ``https://<RUNPOD_POD_ID>-<port>.proxy.runpod.net``. Detection ``runpod_pod_id``.
- Else: ``None`` — off RunPod without an override we do not register (never a guess from the hostname).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True)
class PublicUrl:
    url: str
    detection_method: str  # "public_base_url" or "runpod_pod_id"


class PodAddress(Protocol):
    """What the public URL is made of (``RegistrationSettings`` has both)."""

    public_base_url: str | None
    runpod_pod_id: str | None


def public_url(settings: PodAddress, port: int) -> PublicUrl | None:
    if settings.public_base_url:
        base = settings.public_base_url
        if "{port}" in base:
            return PublicUrl(base.replace("{port}", str(port)), "public_base_url")
        parts = urlsplit(base)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        return PublicUrl(urlunsplit((parts.scheme, f"{host}:{port}", parts.path, "", "")), "public_base_url")
    if settings.runpod_pod_id:
        return PublicUrl(f"https://{settings.runpod_pod_id}-{port}.proxy.runpod.net", "runpod_pod_id")
    return None
