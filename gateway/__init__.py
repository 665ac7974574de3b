"""costwall gateway: an OpenAI-compatible proxy that prices, caps and records every request."""

__version__ = "0.1.0"
