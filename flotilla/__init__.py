"""flotilla: distributed LLM inference and serving."""
