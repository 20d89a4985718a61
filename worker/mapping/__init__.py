"""A Kafka record -> a request member: decoding (json/avro/protobuf), expressions, the mapper, presets.

Knows nothing of the flow, Kafka consuming or calling Personalize.
"""
