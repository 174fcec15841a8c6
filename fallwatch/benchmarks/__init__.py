"""Benchmarks that span several services (each service's own benchmark sits beside it)."""
