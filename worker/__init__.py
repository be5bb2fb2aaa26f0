"""The worker side: replicas that compute gradients, and the single-process trainer.

Imports `common` only.
"""
