"""The pre-registered experiments: their runners, protocols and results."""
