"""kpimon alerting: rules, detectors, alert lifecycle and notifiers."""
