"""One unary gRPC call through grpcio, on raw bytes (no protoc): the e2e tests' real client.

usage: grpc_client.py TARGET AUTHORITY METHOD MESSAGE
Prints one JSON object: {"code": "OK"|"UNAVAILABLE"|…, "details", "reply", "initial", "trailing"}.
"""
import json
import sys

import grpc

target, authority, method, message = sys.argv[1:5]
channel = grpc.insecure_channel(target, options=[("grpc.default_authority", authority)])
call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
out = {}
try:
    reply, state = call.with_call(message.encode(), timeout=10)
    out.update(code="OK", details="", reply=reply.decode(errors="replace"))
    initial, trailing = state.initial_metadata(), state.trailing_metadata()
except grpc.RpcError as err:
    out.update(code=err.code().name, details=err.details(), reply=None)
    initial, trailing = err.initial_metadata(), err.trailing_metadata()
out["initial"] = {k: v for k, v in (initial or ())}
out["trailing"] = {k: v for k, v in (trailing or ())}
print(json.dumps(out))
