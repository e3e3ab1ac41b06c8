"""Scrapes a Carapace health endpoint the way Prometheus tooling would, for the
end-to-end tests, and prints what it saw as JSON. Usage:
    scrape.py <url>
A /metrics body must parse with both of prometheus_client's parsers (OpenMetrics, the
format served, and the classic Prometheus text parser); the samples come from the
OpenMetrics one. Exits non-zero if either parser refuses the body.
"""
import json
import sys
import urllib.error
import urllib.request

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as prometheus_families


def main() -> None:
    url = sys.argv[1]
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            status, body, ctype = r.status, r.read().decode(), r.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        status, body, ctype = e.code, e.read().decode(), e.headers.get("Content-Type")
    except urllib.error.URLError as e:
        # Nothing listens (yet): the caller decides whether that is a failure.
        print(json.dumps({"status": None, "error": str(e.reason)}))
        return
    out = {"status": status, "body": body, "content_type": ctype}
    if url.endswith("/metrics") and status == 200:
        list(prometheus_families(body))
        samples = []
        for family in openmetrics_families(body):
            for s in family.samples:
                samples.append(
                    {
                        "family": family.name,
                        "type": family.type,
                        "name": s.name,
                        "labels": s.labels,
                        "value": s.value,
                    }
                )
        out["samples"] = samples
    print(json.dumps(out))


if __name__ == "__main__":
    main()
