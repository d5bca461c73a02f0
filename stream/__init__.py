"""kpimon stream worker: event contract, aggregation, metrics, CLI."""

__version__ = "0.1.0"
