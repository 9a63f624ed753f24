"""detector: streaming anomaly detection with a per-stream recurrent forecaster."""

__version__ = "0.1.0"
