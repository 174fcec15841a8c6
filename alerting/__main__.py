"""`python -m alerting`: run the alerting worker with settings from the usual sources."""

import sys

from alerting.app import run_alerting
from fallwatch.settings import ConfigError, load_settings

try:
    run_alerting(load_settings())
except ConfigError as exc:
    sys.exit(f"alerting: {exc}")
