"""The Kafka side: consuming, the one place that commits, the dead-letter writer, security.

Imports the flow (the ordered finalizer, the dead-letter record); the flow never imports this.
"""
