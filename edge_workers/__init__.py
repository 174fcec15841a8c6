"""Edge workers: the edge model, the switcher and the consumer that routes frames."""
