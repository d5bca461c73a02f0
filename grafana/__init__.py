"""kpimon's Grafana dashboards as code (grafana-foundation-sdk).

``python -m grafana.generate`` writes ``grafana/dashboards/*.json``, which Grafana
loads by file provisioning (``grafana/provisioning/``). Not installed with the
``kpimon`` package: the SDK is a development dependency, only needed to generate.
"""
