"""Kubernetes adapters: the only place that imports the kubernetes clients."""
