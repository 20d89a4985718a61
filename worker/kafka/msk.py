"""AWS MSK IAM authentication (SASL OAUTHBEARER) through AWS's maintained signer library.

The token is signed with the standard credential chain (environment, profile, IRSA, instance role),
so no Kafka password exists anywhere. Tokens last 15 minutes; aiokafka asks for a new one per
connection, and the signer is synchronous, so it runs in a thread.
"""

from __future__ import annotations

import asyncio

from aiokafka.abc import AbstractTokenProvider
from aws_msk_iam_sasl_signer import MSKAuthTokenProvider


class MskIamTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    def __init__(self, region: str) -> None:
        self._region = region

    async def token(self) -> str:
        token, _expiry_ms = await asyncio.to_thread(MSKAuthTokenProvider.generate_auth_token, self._region)
        return str(token)
