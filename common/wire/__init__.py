"""The wire: addresses, the protocol (the one encode/decode pair), sockets, CurveZMQ
security, the shard client and what every node does with the scheduler.

The only zmq and msgpack in downpour.common. It imports downpour.common.errors, itself,
and the core's layout types where it needs them, nothing else of the project
(tests/test_architecture.py holds it to that).
"""
