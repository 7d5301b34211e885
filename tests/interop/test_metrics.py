"""`/metrics` read by the reference OpenMetrics parser (PyPI ``prometheus-client``).

The parser is strict: one name per family, ``_total`` on counter samples, ``# EOF`` at the
end, escaped label values. A session joins and publishes first, so that the series it counts
are there with values, not only declared.
"""

import urllib.request

from autobahn.wamp.types import PublishOptions
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from wamp_client import join, wamp_test


def _scrape(node) -> tuple[str, str]:
    with urllib.request.urlopen(f"{node.http}/metrics", timeout=10) as res:
        return res.headers.get("Content-Type", ""), res.read().decode()


@wamp_test
async def test_metrics_are_valid_openmetrics_and_count_what_happened(node):
    session = await join(node.ws, node.key, serializer="json")
    # Acknowledged: the node has counted the PUBLISH before it answers.
    await session.publish(
        "com.example.metrics.probe", 1, options=PublishOptions(acknowledge=True)
    )
    content_type, text = _scrape(node)
    assert content_type.startswith("application/openmetrics-text"), content_type
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["macula_sessions"].type == "gauge"
    assert families["macula_sessions"].samples[0].value >= 1
    assert families["macula_sessions_joined"].type == "counter"
    published = [
        s.value
        for s in families["macula_messages_in"].samples
        if s.name == "macula_messages_in_total" and s.labels == {"kind": "publish"}
    ]
    assert published and published[0] >= 1, families["macula_messages_in"].samples
    realm_sessions = {
        s.labels["realm"]: s.value for s in families["macula_realm_sessions"].samples
    }
    assert realm_sessions.get(node.realm, 0) >= 1, realm_sessions
