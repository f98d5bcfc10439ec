"""What every phase shares: the wire models, the task registry, the API, settings."""
