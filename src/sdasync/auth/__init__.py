"""Trust: API keys and tenants (``keys``, ``tenants``), secrets at rest (``secretbox``), quotas (``quotas``) and
the ``sdasync keys`` command (``commands``).

Everything here keeps its state in the task store's backend through ``RecordStore``
(``backends/records.py``), so every API process and Lambda instance sees the same keys, tenants and counters,
and a change (a revoke, a rotation) needs no restart. Import the submodules directly; this package imports
nothing, so ``import sdasync.auth.keys`` stays light (``secretbox``'s KMS box imports boto3 only when used).
"""
