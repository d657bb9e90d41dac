"""Benchmarks: Switchboard measured side by side with its peers (`make bench`)."""
