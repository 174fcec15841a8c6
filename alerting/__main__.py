from fallwatch.cli import run_service_command

run_service_command("alerting")
