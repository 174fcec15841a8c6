"""Cloud workers: batched LLaVA-NeXT-Video verdicts for offloaded frames."""
