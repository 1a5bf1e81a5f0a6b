"""Benchmarks run against real servers: `cairn bench <what>` (events: the event store)."""
