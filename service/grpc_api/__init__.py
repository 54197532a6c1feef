"""gRPC transport: thin servicers over service.inference.core, plus health and reflection."""
