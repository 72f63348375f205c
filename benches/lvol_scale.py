#!/usr/bin/env python3
"""Lvstore scale, ours next to SPDK v24.05's spdk_tgt in the same run: N thin lvols created one by one and a
snapshot of each (RPC operations per second, one client connection, each call waited for, as a control plane
issues them), then the time to load that lvstore again after a restart (bdev_aio_create + bdev_wait_for_examine
until the lvols are listed: SPDK #3864 is a 12-minute load). The base is an aio file in /dev/shm (RAM), so the
device is not what is measured. Each tool builds and loads its own store; ROUNDS alternate between the tools
and the best round of each is kept.

Usage: lvol_scale.py OURS_SPDK_TGT SPDK_SPDK_TGT [N] [ROUNDS]
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from spdk.rpc.client import JSONRPCClient

CLUSTER = 1 << 20
DEV = 8 << 30  # sparse: only metadata is ever written
CONFIG = {"subsystems": [
    {"subsystem": "iobuf", "config": [{"method": "iobuf_set_options",
                                       "params": {"small_pool_count": 1024, "large_pool_count": 64}}]},
    {"subsystem": "bdev", "config": [{"method": "bdev_set_options",
                                      "params": {"bdev_io_pool_size": 1024, "bdev_io_cache_size": 64}}]},
]}


class Target:
    def __init__(self, binary, workdir, tag, spdk):
        self.sock = os.path.join(workdir, tag + ".sock")
        args = [binary, "-m", "0x1", "-r", self.sock]
        if spdk:
            cfg = os.path.join(workdir, "config.json")
            with open(cfg, "w") as f:
                json.dump(CONFIG, f)
            args += ["--no-huge", "-s", "2048", "--disable-cpumask-locks", "-c", cfg]
        self.log = open(os.path.join(workdir, tag + ".log"), "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while True:
            try:
                self.c = JSONRPCClient(self.sock, timeout=600.0)
                self.c.call("spdk_get_version")
                break
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{binary} did not come up (see {self.log.name})")
                time.sleep(0.1)

    def call(self, method, **params):
        return self.c.call(method, params or None)

    def stop(self):
        try:
            self.call("spdk_kill_instance", sig_name="SIGTERM")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def one_round(binary, spdk, n, workdir, tag):
    img = f"/dev/shm/lvol-scale-{os.getpid()}-{tag}.img"
    with open(img, "wb") as f:
        f.truncate(DEV)
    t = None
    try:
        t = Target(binary, workdir, tag + "-a", spdk)
        t.call("bdev_aio_create", name="aio0", filename=img, block_size=4096)
        t.call("bdev_lvol_create_lvstore", bdev_name="aio0", lvs_name="lvs", cluster_sz=CLUSTER)
        start = time.perf_counter()
        for i in range(n):
            t.call("bdev_lvol_create", lvs_name="lvs", lvol_name=f"v{i}", size_in_mib=16,
                   thin_provision=True)
        created = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(n):
            t.call("bdev_lvol_snapshot", lvol_name=f"lvs/v{i}", snapshot_name=f"s{i}")
        snapped = time.perf_counter() - start
        t.stop()
        t = None
        t = Target(binary, workdir, tag + "-b", spdk)
        start = time.perf_counter()
        t.call("bdev_aio_create", name="aio0", filename=img, block_size=4096)
        t.call("bdev_wait_for_examine")
        lvols = t.call("bdev_lvol_get_lvols")
        loaded = time.perf_counter() - start
        t.stop()
        t = None
        if len(lvols) != 2 * n:
            raise RuntimeError(f"{binary}: {len(lvols)} lvols after the load, expected {2 * n}")
        return n / created, n / snapped, loaded
    finally:
        if t is not None:
            # A failed round must not leave a busy-polling target behind.
            t.proc.kill()
            t.proc.wait()
        os.unlink(img)


def main():
    if len(sys.argv) < 3:
        print(__doc__)
        sys.exit(2)
    ours, theirs = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    workdir = tempfile.mkdtemp(prefix="lvol-scale-", dir="/var/tmp")
    best = {"ours": [0, 0, float("inf")], "spdk": [0, 0, float("inf")]}
    try:
        for r in range(rounds):
            for name, binary, spdk in (("ours", ours, False), ("spdk", theirs, True)):
                c, s, l = one_round(binary, spdk, n, workdir, f"{name}{r}")
                b = best[name]
                best[name] = [max(b[0], c), max(b[1], s), min(b[2], l)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    o, s = best["ours"], best["spdk"]
    print(f"{n} thin lvols, then a snapshot of each; best of {rounds} rounds, same run")
    print(f"{'':28}{'ours':>12}{'spdk':>12}{'ratio':>8}")
    print(f"{'bdev_lvol_create /s':28}{o[0]:12.0f}{s[0]:12.0f}{o[0] / s[0]:7.2f}x")
    print(f"{'bdev_lvol_snapshot /s':28}{o[1]:12.0f}{s[1]:12.0f}{o[1] / s[1]:7.2f}x")
    print(f"{'load ' + str(2 * n) + ' lvols (s)':28}{o[2]:12.3f}{s[2]:12.3f}{s[2] / o[2]:7.2f}x")
    print("(ratios: higher is better for ours; the load ratio is SPDK's time / ours)")


if __name__ == "__main__":
    main()
