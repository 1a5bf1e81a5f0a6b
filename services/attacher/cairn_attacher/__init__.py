"""Cairn service."""
