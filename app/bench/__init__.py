"""Benchmarks that print figures: `core` (a training step against PyTorch, the optimizer
update against memory bandwidth), `comm` (push_pull through shard servers against bare
pyzmq), both timed by `timing.interleaved`, and `codecs` (each wire codec's encode and
decode against a plain copy of the same bytes)."""
