"""The inference core and what it needs: the served-model and batch-queue Protocols, batcher,
runtime, decoding, model repository, pre- and post-processing, codecs, devices. Imports nothing
from workers/, explain/, protocol/ or the transports (tests/test_layering.py)."""
