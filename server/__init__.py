"""ZeroMQ server, wire protocol, client library, Tango device and CLI: thin adapters over the core."""
