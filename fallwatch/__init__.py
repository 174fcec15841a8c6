"""fallwatch: streaming fall detection with Dual-Model Distillation (arXiv 2410.12165).

This package is the app shell on top, the only one that imports every service: the
`fallwatch` command line, the demo, the local stack, the dev kit (tiny and reference
model pairs) and the benchmarks. What the services share is in `core`; each service
is its own top-level package (producers, edge_workers, cloud_workers, alerting, dmd_offline).
"""
