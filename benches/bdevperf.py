#!/usr/bin/env python3
"""Starts the tests of a `bdevperf -z` instance, like SPDK's examples/bdev/bdevperf/bdevperf.py.

Usage: bdevperf.py [-s SOCKET] [-t TIMEOUT] perform_tests
Prints the results JSON; exits non-zero if the run failed.
"""
import argparse
import json
import os
import sys

# scripts/deps.sh installs SPDK's client into its own virtual environment (Debian's Python refuses a system-wide
# pip install); when started with another Python, run again with that one.
VENV = "/opt/spdk-rs/venv"
try:
    from spdk.rpc.client import JSONRPCClient, JSONRPCException
except ModuleNotFoundError:
    if os.path.exists(VENV + "/bin/python3") and sys.prefix != VENV:
        os.execv(VENV + "/bin/python3", [VENV + "/bin/python3"] + sys.argv)
    raise


def main():
    p = argparse.ArgumentParser(description="bdevperf RPC client")
    p.add_argument("-s", "--server", default="/var/tmp/spdk.sock", help="RPC socket path")
    p.add_argument("-t", "--timeout", type=float, default=60.0, help="seconds to wait for the answer")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("perform_tests", help="run the configured workload and wait for its results")
    a = p.parse_args()
    client = JSONRPCClient(a.server, timeout=a.timeout)
    try:
        print(json.dumps(client.call("perform_tests"), indent=2))
    except JSONRPCException as e:
        print(e.message, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
