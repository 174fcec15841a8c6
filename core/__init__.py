"""The shared core of the services: imports no service."""
