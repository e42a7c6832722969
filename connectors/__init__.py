"""Emitters: how agents get events into Vigil (the Python SDK and the OpenTelemetry exporter)."""
