"""personalize-worker: Kafka clickstream to Amazon Personalize PutEvents."""

__version__ = "0.1.0"
