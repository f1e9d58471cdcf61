"""Generated protobuf and gRPC code (``make proto``; sources in ``proto/``). Private."""
