"""Talking to containerd: generated API messages, gRPC plumbing, one client, errdefs."""
