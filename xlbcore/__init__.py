"""What xlb's daemons and its CLI share: logging, address parsing, the service model,
domain errors and their gRPC status codes, server bootstrap and process lifecycle.

It imports neither daemon (dpd, policyd): they both depend on it, never the reverse."""
