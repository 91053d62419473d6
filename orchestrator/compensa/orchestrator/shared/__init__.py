"""What every layer of the orchestrator shares: records, errors, durations, limits, payloads, metrics."""
