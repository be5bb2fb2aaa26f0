"""The parameter-server side: shard servers and the scheduler. Imports `common` only."""
