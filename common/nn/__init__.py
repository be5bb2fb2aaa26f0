"""The NumPy core: the flat parameter layout, layers, losses, initialisers, the model,
optimizers and learning-rate schedules.

It imports nothing of the project but downpour.common.errors, and neither zmq nor
msgpack: it knows nothing of the wire or of runs (tests/test_architecture.py holds it
to that). Importing this package does not import NumPy.
"""
