"""cnnserve: an inference microservice for the CIFAR-10 CNN (ONNX Runtime, dynamic batching,
gRPC + HTTP + Open Inference Protocol). Never imports torch."""

__version__ = "0.1.0"
