"""Bridges to other libraries' models and checkpoints."""
