"""The inference core and what it needs: batcher, runtime, model repository, pre- and
post-processing, codecs, devices. Imports nothing from workers/, explain/ or the transports."""
