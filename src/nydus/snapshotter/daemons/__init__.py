"""The nydusd daemons the snapshotter runs: manager, process, supervisor, cache, metrics."""
