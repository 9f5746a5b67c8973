"""Print doublenat's rules on a RouterOS API as one JSON list, read with the real client.

    python -m tests.packaging.router_rules HOST:PORT USER PASSWORD_FILE

The install test runs it in the network namespace of a chroot instance, where the lab's
router emulator listens on loopback.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from doublenat.adapters.routeros import RouterOsClient  # noqa: E402
from doublenat.settings import Endpoint  # noqa: E402

MARK = "double-natpmp-"


def main(argv: list[str]) -> int:
    address, user, password_file = argv
    host, _, port = address.rpartition(":")
    password = Path(password_file).read_text().rstrip("\n")
    client = RouterOsClient(Endpoint(host, int(port)), user, password, timeout=5)
    try:
        rules = [dataclasses.asdict(r) for r in client.list_rules()
                 if r.comment.startswith(MARK)]
    finally:
        client.close()
    print(json.dumps(rules))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
