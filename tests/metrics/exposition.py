"""Reading Prometheus' text exposition (``/metrics``) with the client's own parser."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

#: The sample names each family type exposes (the parser strips ``_total`` from a counter's family name).
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
            "unknown": ("",)}


def families(text: str) -> dict:
    """Family name -> family (its ``type`` and ``samples``)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_names(text: str) -> set[str]:
    """Every sample name ``text`` declares, whether or not a sample was recorded yet (a labelled counter with
    no child yet has its HELP and TYPE lines only)."""
    return {family.name + suffix for family in families(text).values() for suffix in SUFFIXES[family.type]}


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels``; None when there is none."""
    for family in families(text).values():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None
