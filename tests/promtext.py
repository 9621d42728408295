"""Reading a process's Prometheus text the way the tests need it: the sum of one series' samples over labels.

Parsed with prometheus_client's own parser (an independent reader of the exposition format), never by the code
under test. One helper for every test file, instead of a copy in each.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named `name` (e.g. `..._total`) whose labels include `labels`."""
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def scrape(url: str, name: str, timeout: float = 10.0, **labels: str) -> float:
    """`metric_sum` of `url`/metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=timeout) as resp:
        return metric_sum(resp.read().decode(), name, **labels)
