"""Training, evaluation and ONNX export of the cnnserve CIFAR-10 model.

Only ``export.data`` and ``export.evaluate`` are importable without torch; the serving code
(``service``) never imports this package except through the ``cnnserve`` CLI's train/export/evaluate
sub-commands.
"""
