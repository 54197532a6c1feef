"""HTTP transport: a FastAPI app of thin routes over service.inference.core."""
