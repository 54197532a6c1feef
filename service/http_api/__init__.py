"""HTTP transport: a FastAPI app of thin routes over the data plane ``service.server`` hands it
(``service.dataplane``): the inference core, the explainer, readiness."""
