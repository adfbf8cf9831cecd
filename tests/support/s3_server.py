"""moto's S3 server, made to keep its objects across restarts, for tests that restart the object
store mid-render (as a real S3 service or MinIO keeps its data).

Every request is appended to a log (moto's request recorder, `MOTO_ENABLE_RECORDING`); on start
the log's writes are replayed in-process, through moto's own WSGI application, before the server
accepts a connection, so a restarted server holds the objects it held when it stopped.

    python s3_server.py HOST PORT LOG
"""

import base64
import json
import os
import signal
import sys
import threading
from urllib.parse import urlsplit


def main() -> None:
    host, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.environ["MOTO_ENABLE_RECORDING"] = "True"
    os.environ["MOTO_RECORDER_FILEPATH"] = log

    from moto.moto_api import recorder
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.test import Client

    # The server answers on several threads: one log line per request, never interleaved.
    lock = threading.Lock()
    record = recorder._record_request

    def record_locked(*args, **kwargs):
        with lock:
            return record(*args, **kwargs)

    recorder._record_request = record_locked

    replayed = 0
    if os.path.exists(log):
        recorder.stop_recording()
        client = Client(DomainDispatcherApplication(create_backend_app))
        with open(log) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    # The last line of a killed server may be cut short: that request was never
                    # answered, and its client sends it again.
                    continue
                if entry["method"] in ("GET", "HEAD"):
                    continue
                body = entry.get("body") or b""
                if entry.get("body_encoded"):
                    body = base64.b64decode(body)
                url = urlsplit(entry["url"])
                headers = {k: v for k, v in entry["headers"].items() if k.lower() != "transfer-encoding"}
                client.open(url.path, method=entry["method"], query_string=url.query,
                            headers=headers, data=body)
                replayed += 1
        recorder.start_recording()

    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    print(f"s3 server on {host}:{port} ({replayed} requests replayed)", file=sys.stderr, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop()


if __name__ == "__main__":
    main()
