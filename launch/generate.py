"""Moved to `launch.models.generate` (KV-cached generation); this import path keeps working."""

from launch.models.generate import generate, generate_ids

__all__ = ["generate", "generate_ids"]
