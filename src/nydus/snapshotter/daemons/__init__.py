"""The nydusd daemons the snapshotter runs: the manager (:mod:`.manager`), one process
(:mod:`.process`), the failover fd keeper (:mod:`.supervisor`), per-image configs
(:mod:`.imageconfig`), the blob cache (:mod:`.cachegc`) and the Prometheus endpoint
(:mod:`.metrics`)."""
