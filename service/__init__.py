"""gradleak's engine and worker: specs, models, FL simulation, attacks, defenses, metrics, jobs."""

__version__ = "0.1.0"
