"""sink: exactly-once Kafka to ClickHouse sink for usage-metering events."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sink")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
