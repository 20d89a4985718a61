"""The commands that are not the service: check, demo, map dry runs, replay, produce, sample.

The service never imports these.
"""
