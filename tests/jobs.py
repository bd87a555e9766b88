"""Jobs as the app's current producer sends them (the ``["{json}"]`` element form), for handler tests."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from workers.core.job import Job, decode


def producer_job(type: str, prompt: str, defaults: Mapping[str, Any], *, job_id: str = "job-1",
                 small: bool = True, **fields: Any) -> Job:
    """A decoded job; ``config``/``metadata`` given in ``fields`` are merged over ``defaults`` (the small test
    config, used when ``small``); any other field replaces the top-level key."""
    body: dict[str, Any] = {"id": job_id, "type": type, "user_id": "user-1", "prompt": prompt,
                            "config": dict(defaults) if small else {}, "metadata": {}}
    for key, value in fields.items():
        if key in ("config", "metadata"):
            body[key].update(value)
        else:
            body[key] = value
    return decode(json.dumps([json.dumps(body)]))
