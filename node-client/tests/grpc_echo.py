"""A gRPC echo origin and client (Python grpcio) for the funnel's gRPC test.

    grpc_echo.py serve            prints the port of an h2c server on 127.0.0.1, then serves
    grpc_echo.py call PORT CA AUTHORITY
                                  calls it through the edge over TLS and prints what came back

Methods take and return raw bytes (no generated code): Say echoes with a trailer, Count
streams three messages, Fail ends with NOT_FOUND.
"""
import sys
from concurrent import futures

import grpc

SERVICE = "warren.test.Echo"


def serve():
    def say(request, context):
        context.set_trailing_metadata((("x-echo-trailer", "kept"),))
        return b"echo: " + request

    def count(request, context):
        for i in range(3):
            yield f"{request.decode()} {i}".encode()

    def fail(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def call(port, ca, authority):
    with open(ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    options = [("grpc.ssl_target_name_override", "web.funnel.test"), ("grpc.default_authority", authority)]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        say = channel.unary_unary(f"/{SERVICE}/Say")
        reply, state = say.with_call(b"hello grpc", timeout=10)
        trailers = dict(state.trailing_metadata())
        print(f"say: {reply.decode()} trailer={trailers.get('x-echo-trailer')} code={state.code().name}")
        parts = [m.decode() for m in channel.unary_stream(f"/{SERVICE}/Count")(b"part", timeout=10)]
        print(f"count: {parts}")
        try:
            channel.unary_unary(f"/{SERVICE}/Fail")(b"x", timeout=10)
            print("fail: no error")
        except grpc.RpcError as e:
            print(f"fail: {e.code().name} {e.details()}")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        call(sys.argv[2], sys.argv[3], sys.argv[4])
