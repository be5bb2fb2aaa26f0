"""The worker side: replicas that compute gradients, the single-process trainer, Hogwild!.

Imports `downpour.common` only.
"""
