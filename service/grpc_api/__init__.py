"""gRPC transport: thin servicers over service.core, plus health and reflection."""
