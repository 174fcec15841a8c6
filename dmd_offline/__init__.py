"""Offline Dual-Model Distillation: replay logged traffic through both models, build DMD data."""
