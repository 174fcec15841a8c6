"""fallwatch: streaming fall detection with Dual-Model Distillation (arXiv 2410.12165).

This package holds what the services share: settings, the local stack, Kafka
plumbing and the `fallwatch` command line. Each service is its own top-level
package (producers, edge_workers, cloud_workers, alerting, dmd_offline).
"""
