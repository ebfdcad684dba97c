"""trio-tunnel: expose services behind NAT over one multiplexed TCP link."""

__version__ = "0.1.0"
