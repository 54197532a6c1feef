"""gRPC transport: thin servicers over the data plane ``service.server`` hands it
(``service.dataplane``), plus health and reflection."""
