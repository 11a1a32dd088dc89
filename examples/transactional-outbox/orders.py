#!/usr/bin/env python3
"""The transactional outbox with qmesh transactions: an order service that writes each order to its
own SQLite database and publishes the order's event, so that the event is delivered if and only if
the order was committed — even when the service dies between the two commits.

    python3 orders.py --port 8080 --db orders.db [--sidecar 127.0.0.1:7072]

The sidecar's HTTP address defaults to $QMESH_HTTP_ADDR (set by `qmesh run` and in injected pods).

One order, `POST /orders {"id": "o-1", "amount": 42}`:

1. open a qmesh transaction (`POST /v1/transactions`);
2. publish the event to the `order-events` queue in it (header `qmesh-transaction`): stored by the
   sidecar as a half message, invisible to every subscription;
3. insert the order, with the transaction id, in one SQLite transaction, and commit it
   (an order with `"amount" <= 0` is refused: the SQLite transaction rolls back);
4. commit the qmesh transaction (or roll it back when step 3 did): the event becomes deliverable.

If the service dies after step 2, the sidecar asks it — once it is back — whether the transaction
committed: `POST /qmesh/transaction-check {"transaction": ...}` (the Queue's `transaction.checkPort`
is this service's port). The answer comes from the database: the order is there → `commit`; it is
not, and this process is not in the middle of writing it → `rollback`; in the middle → `unknown`
(asked again after `checkAfter`).

For tests, `--die-after db-commit` (or `publish`) makes the service kill itself (SIGKILL) at that
point of the next order: between its database commit and its qmesh commit, or before its database
commit.
"""

import argparse
import json
import os
import signal
import sqlite3
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

QUEUE = "order-events"


class Sidecar:
    """The qmesh sidecar's HTTP API."""

    def __init__(self, addr):
        self.url = "http://" + addr

    def call(self, path, body=b"", headers=None):
        request = urllib.request.Request(
            self.url + path, data=body, method="POST", headers=headers or {}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def begin(self):
        status, body = self.call("/v1/transactions")
        if status != 201:
            raise RuntimeError(f"begin: {status} {body}")
        return body["transaction"]

    def publish(self, transaction, message_id, payload):
        status, body = self.call(
            f"/v1/queues/{QUEUE}/messages",
            payload,
            {"qmesh-id": message_id, "qmesh-transaction": transaction},
        )
        if status != 201:
            raise RuntimeError(f"publish: {status} {body}")

    def settle(self, transaction, how):
        status, body = self.call(f"/v1/transactions/{transaction}/{how}")
        if status != 200:
            raise RuntimeError(f"{how}: {status} {body}")


class Orders:
    """The service's own database, and the transactions it is writing right now."""

    def __init__(self, path, sidecar, die_after):
        self.path = path
        self.sidecar = sidecar
        self.die_after = die_after
        self.writing = set()
        self.lock = threading.Lock()
        with self.db() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS orders ("
                " id TEXT PRIMARY KEY, amount INTEGER NOT NULL, txn TEXT NOT NULL UNIQUE)"
            )

    def db(self):
        return sqlite3.connect(self.path, timeout=10, isolation_level="IMMEDIATE")

    def die(self, point):
        if self.die_after == point:
            print(f"dying after {point}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def place(self, order):
        txn = self.sidecar.begin()
        with self.lock:
            self.writing.add(txn)
        try:
            event = json.dumps({"type": "OrderPlaced", **order}).encode()
            self.sidecar.publish(txn, f"order-{order['id']}", event)
            self.die("publish")
            try:
                with self.db() as db:
                    if int(order["amount"]) <= 0:
                        raise ValueError("amount must be positive")
                    db.execute(
                        "INSERT INTO orders (id, amount, txn) VALUES (?, ?, ?)",
                        (order["id"], int(order["amount"]), txn),
                    )
            except (ValueError, sqlite3.Error) as e:
                self.sidecar.settle(txn, "rollback")
                return 422, {"error": str(e), "transaction": txn}
            self.die("db-commit")
            self.sidecar.settle(txn, "commit")
            return 201, {"order": order["id"], "transaction": txn}
        finally:
            with self.lock:
                self.writing.discard(txn)

    def check(self, txn):
        """What the sidecar's check-back is told about a transaction."""
        with self.lock:
            if txn in self.writing:
                return "unknown"
        with self.db() as db:
            found = db.execute("SELECT 1 FROM orders WHERE txn = ?", (txn,)).fetchone()
        return "commit" if found else "rollback"


def serve(port, orders):
    class Handler(BaseHTTPRequestHandler):
        def answer(self, status, body, content_type="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path == "/orders":
                try:
                    status, answer = orders.place(body)
                except RuntimeError as e:
                    status, answer = 502, {"error": str(e)}
                self.answer(status, answer)
            elif self.path == "/qmesh/transaction-check":
                state = orders.check(body.get("transaction", ""))
                print(f"check-back {body.get('transaction')}: {state}", file=sys.stderr, flush=True)
                self.answer(200, state.encode(), "text/plain")
            else:
                self.answer(404, {"error": "no such path"})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(json.dumps({"listening": server.server_address[1]}), flush=True)
    server.serve_forever()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--db", default="orders.db")
    parser.add_argument("--sidecar", default=os.environ.get("QMESH_HTTP_ADDR", "127.0.0.1:7072"))
    parser.add_argument("--die-after", choices=["publish", "db-commit"])
    args = parser.parse_args()
    serve(args.port, Orders(args.db, Sidecar(args.sidecar), args.die_after))


if __name__ == "__main__":
    main()
