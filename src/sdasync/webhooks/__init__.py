"""Webhooks: Standard Webhooks signatures, the SSRF guard, the sender, the outbox dispatcher for ``completed``
events and the worker's direct ``start`` and ``progress`` events."""
