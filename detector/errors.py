"""Every error the package raises on purpose inherits from DetectorError."""


class DetectorError(Exception):
    """Base class of the package's errors."""


class ConfigError(DetectorError):
    """The configuration is invalid; the message names each bad field and what it expects."""


class InvalidRecord(DetectorError):
    """An input record that cannot be decoded or validated.

    `reason` is a short, fixed label (used as a metric label); `detail` says what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ArtifactError(DetectorError):
    """A model artifact is missing, corrupt, or does not match what the caller needs."""


class SnapshotError(DetectorError):
    """A state snapshot cannot be read or does not match the loaded model."""


class InputError(DetectorError):
    """An input file cannot be used at all (missing, empty header, unknown format)."""


class BrokerError(DetectorError):
    """The embedded Kafka-protocol broker cannot be found, started, reached or used."""
