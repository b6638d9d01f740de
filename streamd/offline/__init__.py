"""Offline: evaluation on held-out speakers and streams, and the benchmark."""
