#!/usr/bin/env python3
"""Starts the tests of a `bdevperf -z` instance, like SPDK's examples/bdev/bdevperf/bdevperf.py.

Usage: bdevperf.py [-s SOCKET] [-t TIMEOUT] perform_tests
Prints the results JSON; exits non-zero if the run failed.
"""
import argparse
import json
import sys

from spdk.rpc.client import JSONRPCClient, JSONRPCException


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
