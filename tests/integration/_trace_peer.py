"""The other process of tests/integration/test_trace_propagation.py.

Serves one gRPC method (a generic handler, so no .proto is needed) on a unix socket, or
answers NATS requests on one subject, continuing the caller's trace either way and writing
its spans to a span file. It touches --ready-file once it serves and stops on SIGTERM,
flushing its spans first.

    python _trace_peer.py grpc --socket S --span-file F --ready-file R
    python _trace_peer.py nats --nats-url U --subject S --span-file F --ready-file R
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

import grpc
import nats
from opentelemetry import baggage, trace

from cairn import telemetry
from cairn.telemetry.grpc_otel import server_interceptors

SERVICE = "cairn.test.TracePeer"
BAGGAGE_KEY = "cairn.volume"
log = logging.getLogger("trace-peer")
tracer = telemetry.tracer("cairn.test.trace_peer")


def ids_of_current_span() -> bytes:
    """What the peer saw, sent back so the test can check it before reading span files."""
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}:{ctx.span_id:016x}".encode()


async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    with tracer.start_as_current_span("peer.echo", attributes={"request.size": len(request)}):
        log.info("echo %d bytes", len(request))
        return ids_of_current_span()


async def serve_grpc(args: argparse.Namespace, stop: asyncio.Event) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.aio.server(interceptors=server_interceptors())
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{args.socket}")
    await server.start()
    try:
        await asyncio.to_thread(Path(args.ready_file).touch)
        await stop.wait()
    finally:
        await server.stop(grace=1)


async def serve_nats(args: argparse.Namespace, stop: asyncio.Event) -> None:
    async def handle(msg) -> None:
        with telemetry.span_from_headers(
            tracer, "peer.handle", msg.headers, attributes={"messaging.destination": msg.subject}
        ) as span:
            span.set_attribute(f"baggage.{BAGGAGE_KEY}", str(baggage.get_baggage(BAGGAGE_KEY)))
            log.info("message on %s", msg.subject)
            answer = ids_of_current_span()
        # Answered after the span ended, so the span is in the file when the test hears back.
        if msg.reply:
            await msg.respond(answer)

    nc = await nats.connect(args.nats_url, allow_reconnect=False)
    try:
        await nc.subscribe(args.subject, cb=handle)
        await nc.flush()
        await asyncio.to_thread(Path(args.ready_file).touch)
        await stop.wait()
    finally:
        await nc.drain()


async def amain(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    serve = serve_grpc if args.mode == "grpc" else serve_nats
    await serve(args, stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("grpc", "nats"))
    parser.add_argument("--socket")
    parser.add_argument("--nats-url")
    parser.add_argument("--subject")
    parser.add_argument("--span-file", required=True)
    parser.add_argument("--ready-file", required=True)
    args = parser.parse_args()
    telemetry.setup("trace-peer", span_file=args.span_file, log_level="INFO")
    try:
        asyncio.run(amain(args))
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    main()
