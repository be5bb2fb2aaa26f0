"""The parameter-server side: shard servers and the scheduler. Imports `downpour.common` only."""
