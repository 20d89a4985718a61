"""The record lifecycle, generic over operations: intake, batching, dedup, coalescing, offsets, delivery.

Knows nothing of Kafka clients: the source feeds it and commits what it finalizes.
"""
