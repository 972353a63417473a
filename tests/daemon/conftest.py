"""Fixtures for running the real daemon as a child process on the tiny model."""

from daemon_helpers import daemon_factory  # noqa: F401  (a fixture, registered by import)
