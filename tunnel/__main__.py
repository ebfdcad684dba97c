"""``python -m trio_tunnel``: the same as the ``trio-tunnel`` console script."""

from trio_tunnel.cli import main

main()
