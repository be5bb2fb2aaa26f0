"""Everything both sides of downpour share.

The model core (layout, layers, losses, initialisers, model), the optimizers and
learning-rate schedules, data loading, settings, metrics and the wire protocol.
`common` imports neither `ps` nor `worker`; the one exception is the command line
(`common/cli.py`), which imports the role it runs, lazily, and nothing else does.

Importing this package does not import NumPy, so the command line can pin the
BLAS thread count before NumPy loads.
"""
