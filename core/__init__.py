"""The shared core below every service: settings, Kafka plumbing, images, metrics, runtime, logging,
camera URLs, clip buffers, checkpoint loading and a command's entry. It imports no service."""
