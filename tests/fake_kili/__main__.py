"""Serve a fake Kili digits project on 127.0.0.1 until interrupted, for manual CLI runs.

    python -m fake_kili --count 300 --noise 0.1     # from the tests folder

It prints the environment to export (KILI_SDK_SKIP_CHECKS, KILI_API_ENDPOINT,
KILI_API_KEY) and the project id. On Ctrl-C or SIGTERM it prints the metadata
of the assets that the tool flagged.
"""

from __future__ import annotations

import argparse
import json
import signal
import time

from . import FakeKili, add_digits_project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="number of digit images (default: %(default)s)")
    parser.add_argument("--noise", type=float, default=0.1, help="fraction of labels flipped (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the flips (default: %(default)s)")
    args = parser.parse_args()
    # A background job ignores Ctrl-C's SIGINT, so SIGTERM stops it the same way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = FakeKili(api_keys={"test-key"}).start()
    truth = add_digits_project(server, count=args.count, noise=args.noise, seed=args.seed)
    flipped = sorted(asset_id for asset_id, (true, given) in truth.items() if true != given)
    print(f"export KILI_SDK_SKIP_CHECKS=1 KILI_API_ENDPOINT={server.endpoint} KILI_API_KEY=test-key", flush=True)
    print(f"project id: digits ({len(truth)} assets, {len(flipped)} flipped labels)", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    flagged = {asset.id: asset.metadata for asset in server.assets.values() if asset.metadata.get("label_error_flagged")}
    print(f"{len(flagged)} flagged assets, {len(set(flagged) & set(flipped))} of them flipped:")
    for asset_id, metadata in sorted(flagged.items()):
        print(asset_id, "flipped" if asset_id in flipped else "not flipped", json.dumps(metadata), f"priority {server.assets[asset_id].priority}")
    server.stop()


if __name__ == "__main__":
    main()
