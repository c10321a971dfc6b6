"""small-dragonfly: peer-to-peer file distribution with a supernode CDN."""

__version__ = "0.1.0"
