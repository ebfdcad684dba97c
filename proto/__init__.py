"""trio-tunnel's wire protocol, sans-I/O: bytes in, events and bytes out. No trio, no sockets, no clock."""
