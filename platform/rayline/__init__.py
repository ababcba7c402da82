"""rayline: distributed RL and ML pipelines on Ray."""

__version__ = "0.1.0"
