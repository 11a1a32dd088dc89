#!/usr/bin/env python3
"""A small qmesh client in Python, over gRPC (grpcio) — an independent implementation of the app API.

Stubs are generated from the repository's .proto files on first use (grpcio-tools bundles protoc),
into a cache directory next to this file.

    pip install grpcio grpcio-tools
    python3 qmesh_client.py publish --queue orders --count 10 [--addr 127.0.0.1:7071]
    python3 qmesh_client.py consume --subscription billing --count 10 [--nack]

`publish` prints one JSON line per message ({"id", "sequence"}); `consume` prints one JSON line per
delivery ({"id", "payload", "attempt", "headers", "key"}) and acks it (or nacks with --nack).
The address defaults to $QMESH_GRPC_ADDR, as `qmesh run` and injected pods set it.
"""

import argparse
import json
import os
import queue
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto" / "proto"
GENERATED = HERE / ".generated"


def load_stubs():
    """Generates (once) and imports the qmesh.v1 stubs."""
    target = GENERATED / "qmesh" / "v1"
    if not (target / "broker_pb2_grpc.py").exists():
        from grpc_tools import protoc
        import grpc_tools

        GENERATED.mkdir(parents=True, exist_ok=True)
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        code = protoc.main([
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={GENERATED}",
            f"--grpc_python_out={GENERATED}",
            str(PROTO_ROOT / "qmesh" / "v1" / "broker.proto"),
        ])
        if code != 0:
            sys.exit(f"protoc failed generating stubs from {PROTO_ROOT}")
        for pkg in [GENERATED / "qmesh", target]:
            (pkg / "__init__.py").touch()
    sys.path.insert(0, str(GENERATED))
    from qmesh.v1 import broker_pb2, broker_pb2_grpc  # noqa: E402

    return broker_pb2, broker_pb2_grpc


def publish(args):
    import grpc

    pb, rpc = load_stubs()
    with grpc.insecure_channel(args.addr) as channel:
        stub = rpc.BrokerStub(channel)
        for i in range(args.count):
            message = pb.Message(
                id=f"{args.id_prefix}{i}" if args.id_prefix else "",
                payload=f"{args.payload} {i}".encode(),
                headers={"lang": "python"},
                key=args.key or "",
            )
            try:
                reply = stub.Publish(pb.PublishRequest(queue=args.queue, message=message))
            except grpc.RpcError as error:
                print(json.dumps({"error": error.code().name, "message": error.details()}), flush=True)
                return 3
            print(json.dumps({"id": reply.id, "sequence": reply.sequence}), flush=True)
    return 0


def consume(args):
    import grpc

    pb, rpc = load_stubs()
    requests = queue.Queue()
    requests.put(pb.SubscribeRequest(open=pb.Open(subscription=args.subscription, max_in_flight=16)))

    def outgoing():
        while True:
            item = requests.get()
            if item is None:
                return
            yield item

    seen = 0
    with grpc.insecure_channel(args.addr) as channel:
        stub = rpc.BrokerStub(channel)
        responses = stub.Subscribe(outgoing(), timeout=args.timeout)
        try:
            for response in responses:
                if not response.HasField("deliveries"):
                    continue
                for d in response.deliveries.deliveries:
                    m = d.message
                    print(json.dumps({
                        "id": m.id,
                        "payload": m.payload.decode(errors="replace"),
                        "attempt": d.attempt,
                        "headers": dict(m.headers),
                        "key": m.key,
                    }), flush=True)
                    if args.nack:
                        requests.put(pb.SubscribeRequest(nack=pb.Nack(receipts=[d.receipt], reason="python says no")))
                    else:
                        requests.put(pb.SubscribeRequest(ack=pb.Ack(receipts=[d.receipt])))
                    seen += 1
                    if args.count and seen >= args.count:
                        requests.put(None)
                        return 0
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                print(json.dumps({"error": error.code().name, "message": error.details()}), flush=True)
                return 3
        finally:
            requests.put(None)
    return 0 if not args.count or seen >= args.count else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default=os.environ.get("QMESH_GRPC_ADDR", "127.0.0.1:7071"))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("publish", help="publish messages")
    p.add_argument("--queue", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--payload", default="hello from python")
    p.add_argument("--key")
    p.add_argument("--id-prefix", default="")
    c = sub.add_parser("consume", help="consume and ack messages")
    c.add_argument("--subscription", required=True)
    c.add_argument("--count", type=int, default=0)
    c.add_argument("--nack", action="store_true")
    c.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    return publish(args) if args.command == "publish" else consume(args)


if __name__ == "__main__":
    sys.exit(main())
