"""Watching it run: metrics, logs, the stall watchdog.

Knows no layer's internals: what it watches comes in through small protocols.
"""
