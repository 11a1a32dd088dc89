"""RabbitMQ client code, as its tutorials write it, run against a qmesh sidecar's AMQP listener.

Each subcommand prints JSON lines on stdout for sidecar/tests/amqp.rs to check:

  hello-send URL QUEUE TEXT              tutorial 1's send.py
  hello-receive URL QUEUE N              tutorial 1's receive.py (auto-ack), until N messages
  new-task URL QUEUE BODY...             tutorial 2's new_task.py, with publisher confirms
  worker URL QUEUE NAME                  tutorial 2's worker.py: durable, prefetch 1, manual ack;
                                         a body "fail..." is nacked with requeue, "reject..." is
                                         rejected without requeue (dead letter now)
  get URL QUEUE                          basic.get until a message comes, then ack it
  errors URL QUEUE                       what a user gets wrong: each error as a line
  more URL                               confirms nacked by a full queue, choosing a Subscription,
                                         ack with multiple=True, basic.cancel
  heartbeat URL QUEUE SECONDS            a quiet connection with a short heartbeat stays up
  delayed URL QUEUE BODY MS              one publish with RabbitMQ's delayed-message header x-delay
  kombu URL QUEUE N                      a second client library (kombu on py-amqp): publish N,
                                         consume them with manual acks
  tx-publish URL QUEUE                   AMQP transactions: two publishes rolled back, two
                                         committed; confirm.select on the channel is refused
  tx-get URL QUEUE N                     N messages by basic.get, each acked in a transaction that
                                         is first rolled back (the message comes again), then
                                         committed
"""

import json
import sys
import time


def emit(**fields):
    print(json.dumps(fields), flush=True)


def pika_connection(url, **overrides):
    import pika

    params = pika.URLParameters(url)
    for key, value in overrides.items():
        setattr(params, key, value)
    return pika.BlockingConnection(params)


def hello_send(url, queue, text):
    connection = pika_connection(url)
    channel = connection.channel()
    channel.queue_declare(queue=queue)
    channel.basic_publish(exchange="", routing_key=queue, body=text)
    emit(sent=text)
    connection.close()


def hello_receive(url, queue, n):
    connection = pika_connection(url)
    channel = connection.channel()
    channel.queue_declare(queue=queue)
    got = []

    def callback(ch, method, properties, body):
        got.append(body.decode())
        emit(received=body.decode(), redelivered=method.redelivered, message_id=properties.message_id)
        if len(got) >= n:
            ch.stop_consuming()

    channel.basic_consume(queue=queue, on_message_callback=callback, auto_ack=True)
    channel.start_consuming()
    connection.close()


def new_task(url, queue, bodies):
    import pika

    connection = pika_connection(url)
    channel = connection.channel()
    channel.queue_declare(queue=queue, durable=True)
    channel.confirm_delivery()
    for i, body in enumerate(bodies):
        # With confirms on, basic_publish returns once the broker acked (raises on a nack).
        channel.basic_publish(
            exchange="",
            routing_key=queue,
            body=body,
            properties=pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=f"task-{i}-{body}",
                content_type="text/plain",
                headers={"attempt-limit": 3, "tenant": "acme"},
            ),
        )
        emit(confirmed=body, message_id=f"task-{i}-{body}")
    connection.close()


def worker(url, queue, name):
    connection = pika_connection(url)
    channel = connection.channel()
    channel.queue_declare(queue=queue, durable=True)

    def callback(ch, method, properties, body):
        text = body.decode()
        if text.startswith("fail"):
            verdict = "nack"
            ch.basic_nack(delivery_tag=method.delivery_tag, requeue=True)
        elif text.startswith("reject"):
            verdict = "reject"
            ch.basic_reject(delivery_tag=method.delivery_tag, requeue=False)
        else:
            verdict = "ack"
            ch.basic_ack(delivery_tag=method.delivery_tag)
        emit(
            worker=name,
            body=text,
            verdict=verdict,
            redelivered=method.redelivered,
            message_id=properties.message_id,
            content_type=properties.content_type,
            delivery_mode=properties.delivery_mode,
            headers={k: (v.decode() if isinstance(v, bytes) else v) for k, v in (properties.headers or {}).items()},
        )

    channel.basic_qos(prefetch_count=1)
    channel.basic_consume(queue=queue, on_message_callback=callback)
    emit(worker=name, ready=True)
    channel.start_consuming()


def get(url, queue):
    connection = pika_connection(url)
    channel = connection.channel()
    empty = 0
    deadline = time.time() + 30
    while time.time() < deadline:
        method, properties, body = channel.basic_get(queue=queue, auto_ack=False)
        if method is None:
            empty += 1
            continue
        channel.basic_ack(delivery_tag=method.delivery_tag)
        emit(got=body.decode(), empty_before=empty, message_id=properties.message_id)
        break
    connection.close()


def errors(url, queue):
    import pika
    from pika import exceptions

    def attempt(what, action):
        connection = pika_connection(url)
        channel = connection.channel()
        try:
            action(channel)
            emit(case=what, error=None)
        except exceptions.ChannelClosedByBroker as e:
            emit(case=what, code=e.reply_code, text=e.reply_text)
        except exceptions.UnroutableError as e:
            emit(case=what, unroutable=len(e.messages))
        except exceptions.NackError as e:
            emit(case=what, nacked=len(e.messages))
        except exceptions.ChannelWrongStateError:
            # Closed by the broker while pika was not waiting on this channel: the reason is kept.
            reason = channel._impl._closing_reason
            emit(case=what, code=reason.reply_code, text=reason.reply_text)
        finally:
            if connection.is_open:
                connection.close()

    attempt("declare an unknown queue", lambda ch: ch.queue_declare(queue="no-such-queue"))
    attempt("server-named queue", lambda ch: ch.queue_declare(queue="", exclusive=True))
    attempt("named exchange", lambda ch: ch.exchange_declare(exchange="logs", exchange_type="fanout"))
    attempt("queue.bind", lambda ch: ch.queue_bind(queue=queue, exchange="amq.direct", routing_key="x"))
    attempt("consume an unknown queue", lambda ch: ch.basic_consume(queue="no-such-queue", on_message_callback=lambda *a: None))

    def too_large(ch):
        ch.basic_publish(exchange="", routing_key=queue, body=b"x" * 5000)
        ch.connection.process_data_events(time_limit=2)
        ch.queue_declare(queue=queue, passive=True)

    attempt("message over maxMessageBytes", too_large)

    def nested(ch):
        ch.basic_publish(exchange="", routing_key=queue, body=b"n", properties=pika.BasicProperties(headers={"nested": {"a": 1}}))
        ch.connection.process_data_events(time_limit=2)
        ch.queue_declare(queue=queue, passive=True)

    attempt("nested header", nested)

    def mandatory(ch):
        ch.confirm_delivery()
        ch.basic_publish(exchange="", routing_key="no-such-queue", body=b"lost?", mandatory=True)

    attempt("mandatory publish to no queue", mandatory)

    def unknown_tag(ch):
        ch.basic_ack(delivery_tag=999)
        ch.connection.process_data_events(time_limit=2)
        ch.queue_declare(queue=queue, passive=True)

    attempt("ack of an unknown delivery tag", unknown_tag)


def more(url):
    import pika
    from pika import exceptions

    # A full queue (retention maxMessages 1, overflow Reject): the second confirm is a nack.
    connection = pika_connection(url)
    channel = connection.channel()
    channel.confirm_delivery()
    outcomes = []
    for i in range(2):
        try:
            channel.basic_publish(exchange="", routing_key="tiny", body=f"t{i}".encode())
            outcomes.append("ack")
        except exceptions.NackError:
            outcomes.append("nack")
    emit(case="full queue", confirms=outcomes)
    connection.close()

    # Two Subscriptions of `multi` serve this pod: consuming needs x-qmesh-subscription.
    connection = pika_connection(url)
    channel = connection.channel()
    try:
        channel.basic_consume(queue="multi", on_message_callback=lambda *a: None)
        emit(case="ambiguous consume", error=None)
    except exceptions.ChannelClosedByBroker as e:
        emit(case="ambiguous consume", code=e.reply_code, text=e.reply_text)
    if connection.is_open:
        connection.close()
    connection = pika_connection(url)
    channel = connection.channel()
    tag = channel.basic_consume(queue="multi", on_message_callback=lambda *a: None,
                                arguments={"x-qmesh-subscription": "multi-b"})
    # basic.cancel answers cancel-ok; the channel stays usable.
    channel.basic_cancel(tag)
    channel.queue_declare(queue="multi", passive=True)
    emit(case="chosen consume and cancel", tag=tag, open=channel.is_open)
    connection.close()

    # Five deliveries held unacked (prefetch 5), then one ack with multiple=True settles them all.
    connection = pika_connection(url)
    channel = connection.channel()
    channel.confirm_delivery()
    for i in range(5):
        channel.basic_publish(exchange="", routing_key="multi", body=f"m{i}".encode())
    channel.basic_qos(prefetch_count=5)
    got = []

    def on_message(ch, method, properties, body):
        got.append(method.delivery_tag)
        if len(got) == 5:
            ch.basic_ack(delivery_tag=method.delivery_tag, multiple=True)
            ch.stop_consuming()

    channel.basic_consume(queue="multi", on_message_callback=on_message,
                          arguments={"x-qmesh-subscription": "multi-a"})
    channel.start_consuming()
    emit(case="ack multiple", tags=got)
    connection.close()


def heartbeat(url, queue, seconds):
    import pika

    connection = pika_connection(url, heartbeat=1)
    channel = connection.channel()
    channel.confirm_delivery()
    connection.sleep(seconds)
    channel.basic_publish(exchange="", routing_key=queue, body=b"after a quiet spell",
                          properties=pika.BasicProperties(message_id="after-quiet"))
    emit(alive=True, heartbeat=connection._impl.params.heartbeat)
    connection.close()


def delayed(url, queue, body, ms):
    import pika

    connection = pika_connection(url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish(exchange="", routing_key=queue, body=body,
                          properties=pika.BasicProperties(message_id=body, headers={"x-delay": ms}))
    emit(confirmed=body, delay_ms=ms)
    connection.close()


def kombu_roundtrip(url, queue_name, n):
    from kombu import Connection, Consumer, Exchange, Queue

    queue = Queue(queue_name, exchange=Exchange(""), routing_key=queue_name, durable=True, no_declare=False)
    with Connection(url) as conn:
        with conn.channel() as channel:
            producer = conn.Producer(channel=channel)
            for i in range(n):
                producer.publish(
                    {"n": i},
                    exchange="",
                    routing_key=queue_name,
                    serializer="json",
                    delivery_mode=2,
                    message_id=f"kombu-{i}",
                    headers={"client": "kombu"},
                )
            emit(published=n)
        got = []

        def on_message(body, message):
            got.append(body["n"])
            emit(kombu_received=body["n"], message_id=message.properties.get("message_id"),
                 content_type=message.content_type)
            message.ack()

        with Consumer(conn, queues=[queue], callbacks=[on_message], accept=["json"], prefetch_count=10):
            deadline = time.time() + 30
            while len(got) < n and time.time() < deadline:
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    pass
                except Exception as e:  # socket.timeout on older Pythons
                    if "timed out" not in str(e):
                        raise
        emit(kombu_done=sorted(got))


def tx_publish(url, queue):
    from pika import exceptions

    connection = pika_connection(url)
    channel = connection.channel()
    channel.tx_select()
    for body in (b"tx-rolled-back-1", b"tx-rolled-back-2"):
        channel.basic_publish(exchange="", routing_key=queue, body=body)
    channel.tx_rollback()
    emit(step="rolled back")
    for body in (b"tx-committed-1", b"tx-committed-2"):
        channel.basic_publish(exchange="", routing_key=queue, body=body)
    channel.tx_commit()
    emit(step="committed")
    try:
        channel.confirm_delivery()
        emit(case="confirm on a transactional channel", error=None)
    except exceptions.ChannelClosedByBroker as e:
        emit(case="confirm on a transactional channel", code=e.reply_code, text=e.reply_text)
    connection.close()


def tx_get(url, queue, n):
    connection = pika_connection(url)
    got = 0
    deadline = time.time() + 30
    while got < n and time.time() < deadline:
        channel = connection.channel()
        channel.tx_select()
        method, properties, body = channel.basic_get(queue=queue, auto_ack=False)
        if method is None:
            channel.close()
            continue
        channel.basic_ack(delivery_tag=method.delivery_tag)
        if not method.redelivered:
            # The ack is part of the transaction: rolled back, the message is still unacked here,
            # and comes again once the channel closes.
            channel.tx_rollback()
            emit(rolled_back=body.decode())
            channel.close()
            continue
        channel.tx_commit()
        emit(got=body.decode(), redelivered=method.redelivered)
        got += 1
        channel.close()
    connection.close()


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "hello-send":
        hello_send(args[0], args[1], args[2])
    elif command == "hello-receive":
        hello_receive(args[0], args[1], int(args[2]))
    elif command == "new-task":
        new_task(args[0], args[1], args[2:])
    elif command == "worker":
        worker(args[0], args[1], args[2])
    elif command == "get":
        get(args[0], args[1])
    elif command == "errors":
        errors(args[0], args[1])
    elif command == "more":
        more(args[0])
    elif command == "heartbeat":
        heartbeat(args[0], args[1], float(args[2]))
    elif command == "delayed":
        delayed(args[0], args[1], args[2], int(args[3]))
    elif command == "tx-publish":
        tx_publish(args[0], args[1])
    elif command == "tx-get":
        tx_get(args[0], args[1], int(args[2]))
    elif command == "kombu":
        kombu_roundtrip(args[0], args[1], int(args[2]))
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
