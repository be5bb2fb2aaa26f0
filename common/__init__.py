"""Everything both sides of downpour share, in three layers.

    nn/     the NumPy core: layout, layers, losses, initialisers, model, optimizers,
            schedules (no zmq, no files)
    wire/   addresses, protocol, sockets, security, the shard client, node (the only zmq)
    *.py    the run level: settings, data, the training step, evaluation, metrics,
            checkpoints, file output; it may use the core, never the wire

`downpour.common` imports nothing else of the project. Importing this package does not
import NumPy, so the command line can pin the BLAS thread count before NumPy loads.
"""
