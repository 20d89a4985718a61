"""The Personalize side: operations, the lean HTTP client and signing, rate limit, retry.

Knows nothing of Kafka or the flow: it sends requests and says how each ended.
"""
