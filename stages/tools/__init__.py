"""Tools around the stages, not stages themselves: the producer client, the
administrative operations, the demo and the `devsched` command line."""
