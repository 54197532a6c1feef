"""The grpc.aio server: Classifier, Open Inference Protocol, health and reflection on one port."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.dataplane import DataPlane
from service.grpc_api import classifier, http2_limits, inference_service, reset_budget
from service.grpc_api.calls_per_client import CallsPerClient
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2_grpc
from service.grpc_api.instrumented import GuardedRegistration
from service.metrics import Metrics
from service.security.setup import Security
from service.settings import Settings

log = logging.getLogger("cnnserve.grpc")


class GrpcServer:
    def __init__(
        self,
        plane: DataPlane,
        metrics: Metrics,
        settings: Settings,
        reuse_port: bool = False,
        security: Security | None = None,
        private_socket: str | None = None,
    ) -> None:
        """``private_socket``: a Unix socket path this process alone listens on as well (plaintext),
        for its own readiness check: the shared TCP port may route a check to another front end."""
        limit = settings.max_request_bytes
        self.server = grpc.aio.server(
            interceptors=security.grpc_interceptors(metrics) if security else None,  # access keys
            maximum_concurrent_rpcs=settings.max_connections,  # past it: RESOURCE_EXHAUSTED at once
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Front ends of a multi-process server share the port; a lone server must own it.
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                *http2_limits.server_options(settings),  # streams, resets, compression, handshake
            ],
        )
        # Malformed protobuf: INVALID_ARGUMENT; no message body_timeout_seconds after the headers:
        # DEADLINE_EXCEEDED; compressed: UNIMPLEMENTED (service/grpc_api/instrumented.py).
        # Rapid reset: an address cancelling calls before their message is boxed past a budget.
        self.reset_budget = reset_budget.ResetBudget(
            settings.grpc_max_early_resets, penalty_seconds=settings.grpc_penalty_seconds, metrics=metrics
        )
        # One address's calls in progress capped: the other call slots stay for everyone else.
        calls = CallsPerClient(settings.grpc_max_calls_per_client)
        guarded = GuardedRegistration(self.server, metrics, settings.body_timeout_seconds, self.reset_budget, calls)
        classifier_pb2_grpc.add_ClassifierServicer_to_server(classifier.ClassifierServicer(plane, metrics), guarded)
        self.service_names = [classifier.SERVICE_NAME]
        inference_service.add_to_server(plane, metrics, guarded)
        self.service_names.append(inference_service.SERVICE_NAME)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, guarded)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        address = f"{settings.host}:{settings.grpc_port}"
        credentials = security.grpc_credentials() if security else None
        if credentials is not None:
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {settings.host}:{settings.grpc_port}")
        if private_socket is not None:
            Path(private_socket).unlink(missing_ok=True)  # a predecessor's, in the same run folder
            self.server.add_insecure_port(f"unix:{private_socket}")
        self.reset_budget.local_port = self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()

    async def stop(self, grace: float) -> None:
        """Stop accepting calls; let calls in flight finish for up to ``grace`` seconds."""
        await self.server.stop(grace)
