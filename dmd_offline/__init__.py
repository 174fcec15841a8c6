"""Offline Dual-Model Distillation: replay traffic through both models, train, threshold, evaluate, publish."""
