"""Vigil: a governed pipeline for AI agent telemetry."""
