"""A gRPC client not written in Rust: calls grpc.health.v1 and server reflection on the
coordinator over TLS (no client certificate), with hand-encoded protobuf so it needs nothing
generated. Usage: health_reflection.py HOST:PORT CA.pem"""
import sys

import grpc

addr, ca = sys.argv[1], open(sys.argv[2], "rb").read()
channel = grpc.secure_channel(
    addr,
    grpc.ssl_channel_credentials(root_certificates=ca),
    options=(("grpc.ssl_target_name_override", "coordinator.lifeboat"),),
)
ident = lambda b: b
check = channel.unary_unary(
    "/grpc.health.v1.Health/Check", request_serializer=ident, response_deserializer=ident
)
# HealthCheckResponse { status: SERVING } is the two bytes 08 01.
assert check(b"", timeout=10) == b"\x08\x01", "server not SERVING"
service = b"lifeboat.v1.Session"
assert check(b"\x0a" + bytes([len(service)]) + service, timeout=10) == b"\x08\x01"

reflect = channel.stream_stream(
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    request_serializer=ident,
    response_deserializer=ident,
)
# ServerReflectionRequest { list_services: "" } is field 7, an empty string: 3a 00.
answers = list(reflect(iter([b"\x3a\x00"]), timeout=10))
listing = b"".join(answers)
for name in (b"lifeboat.v1.Session", b"lifeboat.v1.Enrollment", b"lifeboat.v1.Admin",
             b"grpc.health.v1.Health"):
    assert name in listing, (name, listing)
print("health SERVING; reflection lists", listing.count(b"\x0a") , "entries")
