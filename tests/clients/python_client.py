#!/usr/bin/env python3
"""Sends tracks and identifies to a schematic-sync daemon through Segment's
official Python library (`segment-analytics-python`, imported as
`segment.analytics`), unchanged: only its documented settings are used.

    python_client.py URL WRITE_KEY RUN_ID COUNT [--gzip] [--batch-size N]

Each argument may come from the environment instead (SEGMENT_HOST,
SEGMENT_WRITE_KEY, CLIENT_RUN_ID, CLIENT_COUNT, CLIENT_GZIP=1,
CLIENT_BATCH_SIZE). For i in 0..COUNT it sends, interleaved:

- a track: userId "{run}-u{i}", event NAMES[i % 4], properties (order_id,
  revenue, currency, products), and context.groupId "{run}-g{i % 3}" when i
  is even (none when odd);
- an identify: userId "{run}-u{i}", traits name "User {i}", company_name
  "Company {i % 3}", email, plan ("pro" for even i, else "free"), seats i,
  and context.groupId "{run}-g{i % 3}".

`tests/clients.rs` derives the expected Schematic events from the same rules.

The library batches in a background consumer thread (`upload_size` messages
at most a request). Every request it makes is seen through its own debug log
("making request: {json}") on a handler given as `log_handler`; at the end
one JSON line goes to stdout:
{"library", "version", "messages", "requests", "batch_sizes", "errors"}.
The exit code is non-zero if the library reported any error (`on_error`, an
error log record) or if not every message went out in a successful request.
"""

import argparse
import json
import logging
import os
import sys

from segment.analytics import Client
from segment.analytics.version import VERSION

NAMES = ["Order Completed", "Checkout Started", "Product Added", "orderShipped"]


def parse_args():
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", default=env("SEGMENT_HOST"))
    parser.add_argument("write_key", nargs="?", default=env("SEGMENT_WRITE_KEY"))
    parser.add_argument("run_id", nargs="?", default=env("CLIENT_RUN_ID"))
    parser.add_argument("count", nargs="?", type=int, default=env("CLIENT_COUNT"))
    parser.add_argument("--gzip", action="store_true", default=env("CLIENT_GZIP") == "1")
    parser.add_argument("--batch-size", type=int, default=int(env("CLIENT_BATCH_SIZE") or 10))
    args = parser.parse_args()
    missing = [n for n in ("url", "write_key", "run_id", "count") if getattr(args, n) in (None, "")]
    if missing:
        parser.error("missing: " + ", ".join(missing))
    args.count = int(args.count)
    return args


class RequestLog(logging.Handler):
    """Keeps what the library logs: the batches it posts and its errors."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.batch_sizes = []
        self.uploaded = 0
        self.errors = []

    def emit(self, record):
        if record.msg == "making request: %s":
            body = json.loads(record.args[0])
            self.batch_sizes.append(len(body["batch"]))
        elif record.msg == "data uploaded successfully":
            self.uploaded += 1
        elif record.levelno >= logging.WARNING:
            self.errors.append(record.getMessage())


def main():
    args = parse_args()
    run = args.run_id
    log = RequestLog()
    errors = []

    def on_error(error, batch):
        errors.append("%s (batch of %d)" % (error, len(batch)))

    client = Client(
        args.write_key,
        host=args.url,
        gzip=args.gzip,
        upload_size=args.batch_size,
        on_error=on_error,
        max_retries=3,
        timeout=15,
        debug=True,
        log_handler=log,
    )
    for i in range(args.count):
        user = "%s-u%d" % (run, i)
        context = {"groupId": "%s-g%d" % (run, i % 3)} if i % 2 == 0 else {}
        client.track(
            user_id=user,
            event=NAMES[i % len(NAMES)],
            properties={
                "order_id": "%s-order-%d" % (run, i),
                "revenue": 10.5 + i,
                "currency": "USD",
                "products": [{"sku": "sku-%d" % i, "quantity": 1 + i % 2}],
            },
            context=context,
        )
        client.identify(
            user_id=user,
            traits={
                "name": "User %d" % i,
                "company_name": "Company %d" % (i % 3),
                "email": "u%d@example.com" % i,
                "plan": "pro" if i % 2 == 0 else "free",
                "seats": i,
            },
            context={"groupId": "%s-g%d" % (run, i % 3)},
        )
    # flush() waits until the consumer has taken and finished every message;
    # join() then stops the consumer thread.
    client.shutdown()

    messages = 2 * args.count
    sent = sum(log.batch_sizes)
    errors.extend(log.errors)
    if sent != messages:
        errors.append("%d messages queued, %d sent in requests" % (messages, sent))
    if log.uploaded != len(log.batch_sizes):
        errors.append("%d requests made, %d answered 2xx" % (len(log.batch_sizes), log.uploaded))
    summary = {
        "library": "analytics-python",
        "version": VERSION,
        "gzip": args.gzip,
        "messages": messages,
        "requests": len(log.batch_sizes),
        "batch_sizes": log.batch_sizes,
        "errors": errors,
    }
    print(json.dumps(summary), flush=True)
    if errors:
        for error in errors:
            print("python client error: %s" % error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
