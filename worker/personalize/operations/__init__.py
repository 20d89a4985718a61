"""The pure core of the five Personalize Events operations: specs read from botocore's model, record mapping,
CDC envelopes, id coalescing and request bodies. It knows no Kafka, asyncio, HTTP client, metrics or clock."""
