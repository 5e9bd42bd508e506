"""Idlegrid worker agent: leases work units from a marketplace, computes them, reports signed results.

Installable without Django, Celery or web3. Torch is imported only in the child process that computes.
"""

__version__ = "0.1.0"
