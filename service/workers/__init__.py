"""The multi-process mode: supervisor, device executor, the front end's remote batch queue, the shared-memory layout."""
