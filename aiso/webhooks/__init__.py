"""Signed client webhooks (Standard Webhooks), and the verifier receivers use.

Receivers check a delivery with::

    from aiso.webhooks import verify
    event = verify(secret, request.headers, await request.body())  # raises WebhookVerificationError

Every delivery carries ``webhook-id`` (stable across retries: dedupe on it),
``webhook-timestamp`` and ``webhook-signature`` (``v1,<base64 HMAC-SHA256>`` over
``id.timestamp.body``, keyed with the ``whsec_…`` secret in ``AISO_WEBHOOK_SECRET``).
"""

from aiso.webhooks.signing import WebhookVerificationError, decode_secret, sign, verify

__all__ = ["WebhookVerificationError", "decode_secret", "sign", "verify"]
