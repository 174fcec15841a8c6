"""`fallwatch bench …`: each benchmark prints a table against a baseline measured in the same run.

A `*_command` module is the typer command, free of heavy imports; the module it runs holds the measurements.
"""
