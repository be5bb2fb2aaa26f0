"""Benchmarks that print figures: `core` (a training step against PyTorch, the optimizer
update against memory bandwidth) and `comm` (push_pull through shard servers against bare
pyzmq), both timed by `timing.interleaved`."""
