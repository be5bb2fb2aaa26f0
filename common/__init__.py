"""Everything both sides of downpour share.

The model core (layout, layers, losses, initialisers, model), the optimizers and
learning-rate schedules, data loading, settings, metrics, the wire protocol and the
shard client. `downpour.common` imports nothing else of the project.

Importing this package does not import NumPy, so the command line can pin the
BLAS thread count before NumPy loads.
"""
