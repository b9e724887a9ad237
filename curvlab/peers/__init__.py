"""Peer libraries wrapped behind curvlab's interface (BackPACK), for cross-checks."""
