#!/usr/bin/env python3
"""NVMe/TCP tracing proxy: listens on 127.0.0.1:LISTEN, forwards every connection to 127.0.0.1:TARGET and prints
each command capsule with its response status, one line per command, so what a host (e.g. the kernel in the lab
guest) sends and what the target answers can be compared between targets.

    python3 lab/tools/nvme_tcp_trace.py LISTEN TARGET [--out FILE] [--data]
    NVMF_PORT=TARGET NVMF_GUEST_PORT=LISTEN cargo test -p nvmf --test kernel_host

Line format: `c<conn> q<qid> <command> <details> -> <status> [dw0=...]`. `--data` also prints PDU types. Stops on
SIGINT/SIGTERM. Digests are not supported (the lab does not enable them).
"""

import argparse
import signal
import socket
import struct
import sys
import threading

PDU = {0: "ICReq", 1: "ICResp", 2: "H2CTermReq", 3: "C2HTermReq", 4: "CapsuleCmd", 5: "CapsuleResp",
       6: "H2CData", 7: "C2HData", 9: "R2T"}
ADMIN = {0x00: "DeleteIOSQ", 0x01: "CreateIOSQ", 0x02: "GetLogPage", 0x04: "DeleteIOCQ", 0x05: "CreateIOCQ",
         0x06: "Identify", 0x08: "Abort", 0x09: "SetFeatures", 0x0A: "GetFeatures", 0x0C: "AsyncEventRequest",
         0x0D: "NSManagement", 0x10: "FWCommit", 0x11: "FWDownload", 0x14: "DeviceSelfTest", 0x15: "NSAttach",
         0x18: "KeepAlive", 0x19: "DirectiveSend", 0x1A: "DirectiveRecv", 0x7C: "DoorbellBufferConfig",
         0x80: "FormatNVM", 0x81: "SecuritySend", 0x82: "SecurityRecv", 0x84: "Sanitize"}
IO = {0x00: "Flush", 0x01: "Write", 0x02: "Read", 0x04: "WriteUncorrectable", 0x05: "Compare",
      0x08: "WriteZeroes", 0x09: "DatasetManagement", 0x0D: "ReservationRegister", 0x0E: "ReservationReport",
      0x11: "ReservationAcquire", 0x15: "ReservationRelease", 0x19: "Copy"}
FABRICS = {0x00: "PropertySet", 0x01: "Connect", 0x04: "PropertyGet", 0x05: "AuthSend", 0x06: "AuthRecv",
           0x08: "Disconnect"}
PROPS = {0x00: "CAP", 0x08: "VS", 0x0C: "INTMS", 0x10: "INTMC", 0x14: "CC", 0x1C: "CSTS", 0x20: "NSSR"}
LOGS = {0x01: "Error", 0x02: "SMART", 0x03: "FirmwareSlot", 0x04: "ChangedNSList", 0x05: "CmdsSupportedEffects",
        0x06: "DeviceSelfTest", 0x0C: "ANA"}
LOGS.update({0x70: "Discovery", 0x0D: "PersistentEventLog", 0x80: "ReservationNotification"})
FEATS = {0x01: "Arbitration", 0x02: "PowerMgmt", 0x04: "TempThreshold", 0x05: "ErrorRecovery",
         0x06: "VolatileWriteCache", 0x07: "NumberOfQueues", 0x08: "IntCoalescing", 0x09: "IntVectorConfig",
         0x0A: "WriteAtomicity", 0x0B: "AsyncEventConfig", 0x0C: "AutonomousPowerState", 0x0D: "HostMemBuf",
         0x0E: "Timestamp", 0x0F: "KeepAliveTimer", 0x10: "HostCtrlThermalMgmt", 0x81: "HostIdentifier",
         0x82: "ReservationNotifMask", 0x83: "ReservationPersistence"}
CNS = {0x00: "Namespace", 0x01: "Controller", 0x02: "ActiveNSList", 0x03: "NSIdDescriptors",
       0x05: "IOCSNamespace", 0x06: "IOCSController", 0x07: "IOCSActiveNSList", 0x08: "IOCSIndependentNS",
       0x1C: "IOCommandSet"}

lock = threading.Lock()
out = sys.stdout
show_data = False


def emit(line):
    with lock:
        out.write(line + "\n")
        out.flush()


def describe(sqe, qid):
    """Name and details of one 64-byte submission queue entry on queue `qid`."""
    opc = sqe[0]
    nsid, = struct.unpack_from("<I", sqe, 4)
    cdw10, cdw11, cdw12, cdw13 = struct.unpack_from("<IIII", sqe, 40)
    if opc == 0x7F:
        fct = sqe[4]
        name = FABRICS.get(fct, "Fabrics(0x%02x)" % fct)
        if fct == 0x01:
            recfmt, cqid, sqsize, cattr, kato = struct.unpack_from("<HHHBxI", sqe, 40)
            return name, "qid=%d sqsize=%d cattr=0x%x kato=%dms" % (cqid, sqsize, cattr, kato)
        if fct in (0x00, 0x04):
            attrib = sqe[40]
            off, = struct.unpack_from("<I", sqe, 44)
            d = "%s(0x%x) size=%d" % (PROPS.get(off, "?"), off, 8 if attrib & 1 else 4)
            if fct == 0x00:
                val, = struct.unpack_from("<Q", sqe, 48)
                d += " value=0x%x" % val
            return name, d
        return name, ""
    if qid == 0:
        name = ADMIN.get(opc, "Admin(0x%02x)" % opc)
        if opc == 0x02:
            lid = cdw10 & 0xFF
            numd = ((cdw10 >> 16) | ((cdw11 & 0xFFFF) << 16)) + 1
            off = cdw12 | (cdw13 << 32)
            return name, "lid=0x%02x(%s) lsp=0x%x nsid=0x%x len=%d off=%d rae=%d" % (
                lid, LOGS.get(lid, "?"), (cdw10 >> 8) & 0x7F, nsid, numd * 4, off, (cdw10 >> 15) & 1)
        if opc == 0x06:
            cns = cdw10 & 0xFF
            return name, "cns=0x%02x(%s) nsid=0x%x cntid=%d csi=%d" % (
                cns, CNS.get(cns, "?"), nsid, cdw10 >> 16, cdw11 >> 24)
        if opc in (0x09, 0x0A):
            fid = cdw10 & 0xFF
            d = "fid=0x%02x(%s) nsid=0x%x cdw11=0x%x" % (fid, FEATS.get(fid, "?"), nsid, cdw11)
            if opc == 0x0A:
                d += " sel=%d" % ((cdw10 >> 8) & 7)
            else:
                d += " sv=%d" % (cdw10 >> 31)
            return name, d
        return name, "nsid=0x%x cdw10=0x%x cdw11=0x%x" % (nsid, cdw10, cdw11)
    name = IO.get(opc, "IO(0x%02x)" % opc)
    if opc in (0x01, 0x02, 0x05, 0x08, 0x04):
        slba = cdw10 | (cdw11 << 32)
        return name, "nsid=%d slba=%d nlb=%d" % (nsid, slba, (cdw12 & 0xFFFF) + 1)
    if opc == 0x09:
        return name, "nsid=%d ranges=%d attr=0x%x" % (nsid, (cdw10 & 0xFF) + 1, cdw11)
    return name, "nsid=%d" % nsid


class Conn:
    """One proxied connection: the queue it carries and the commands waiting for their response."""

    def __init__(self, n):
        self.n = n
        self.qid = None
        self.pending = {}
        self.io_count = {}
        self.data_len = {}


def pdus(data):
    """Splits a byte buffer into complete PDUs; returns (pdus, rest)."""
    res = []
    while len(data) >= 8:
        plen, = struct.unpack_from("<I", data, 4)
        if plen < 8 or len(data) < plen:
            break
        res.append(data[:plen])
        data = data[plen:]
    return res, data


def on_host_pdu(c, p):
    t = p[0]
    if show_data or t not in (4, 6):
        emit("c%d %s pdu %s len=%d" % (c.n, "->", PDU.get(t, hex(t)), len(p)))
    if t == 0:
        pfv, hpda, dgst, maxr2t = struct.unpack_from("<HBBI", p, 8)
        emit("c%d ICReq pfv=%d hpda=%d digest=0x%x maxr2t=%d" % (c.n, pfv, hpda, dgst, maxr2t))
    if t != 4:
        return
    sqe = p[8:72]
    cid, = struct.unpack_from("<H", sqe, 2)
    if c.qid is None and sqe[0] == 0x7F and sqe[4] == 0x01:
        c.qid, = struct.unpack_from("<H", sqe, 42)
    qid = c.qid if c.qid is not None else -1
    name, d = describe(sqe, qid)
    incap = len(p) - p[3] if p[3] else 0
    if name == "Connect" and incap >= 1024 and p[3]:
        data = p[p[3]:]
        hostid = data[0:16].hex()
        cntlid, = struct.unpack_from("<H", data, 16)
        subnqn = data[256:512].split(b"\0")[0].decode(errors="replace")
        hostnqn = data[512:768].split(b"\0")[0].decode(errors="replace")
        d += " cntlid=0x%x subnqn=%s hostnqn=%s hostid=%s" % (cntlid, subnqn, hostnqn, hostid)
    elif incap:
        d += " incapsule=%d" % incap
    c.pending[cid] = (name, d)


def on_target_pdu(c, p):
    t = p[0]
    if show_data or t not in (5, 7, 9):
        emit("c%d %s pdu %s len=%d" % (c.n, "<-", PDU.get(t, hex(t)), len(p)))
    if t == 1:
        pfv, cpda, dgst, maxh2c = struct.unpack_from("<HBBI", p, 8)
        emit("c%d ICResp pfv=%d cpda=%d digest=0x%x maxh2cdata=%d" % (c.n, pfv, cpda, dgst, maxh2c))
    if t in (2, 3):
        fes, = struct.unpack_from("<H", p, 8)
        emit("c%d TermReq fes=0x%x" % (c.n, fes))
    if t == 7:
        # C2HData with the SUCCESS flag (0x08, only with LAST_PDU 0x04) completes the command: no CapsuleResp.
        cid, datao, datal = struct.unpack_from("<HxxII", p, 8)
        c.data_len[cid] = c.data_len.get(cid, 0) + datal
        if p[1] & 0x08:
            complete(c, cid, "OK (C2HData SUCCESS)", "")
        return
    if t != 5:
        return
    dw0, dw1, sqhd, sqid, cid, status = struct.unpack_from("<IIHHHH", p, 8)
    sc, sct, dnr = (status >> 1) & 0xFF, (status >> 9) & 7, (status >> 15) & 1
    st = "OK" if sc == 0 and sct == 0 else "sct=%d sc=0x%02x%s" % (sct, sc, " dnr" if dnr else "")
    complete(c, cid, st, " dw0=0x%x dw1=0x%x" % (dw0, dw1))


def complete(c, cid, st, extra):
    name, d = c.pending.pop(cid, ("?", "cid=%d" % cid))
    n = c.data_len.pop(cid, 0)
    if n:
        extra += " data=%d" % n
    q = c.qid if c.qid is not None else -1
    if q > 0 and name in ("Read", "Write") and st.startswith("OK") and not show_data:
        c.io_count[name] = c.io_count.get(name, 0) + 1
        return
    emit("c%d q%d %s %s -> %s%s" % (c.n, q, name, d, st, extra))


def pump(src, dst, c, handler, other):
    buf = b""
    try:
        while True:
            data = src.recv(1 << 16)
            if not data:
                break
            dst.sendall(data)
            buf += data
            ps, buf = pdus(buf)
            for p in ps:
                handler(c, p)
    except OSError:
        pass
    finally:
        for s in (dst, other):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listen, target):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", listen))
    ls.listen(64)
    emit("proxy 127.0.0.1:%d -> 127.0.0.1:%d" % (listen, target))
    n = 0
    while True:
        h, addr = ls.accept()
        n += 1
        c = Conn(n)
        try:
            t = socket.create_connection(("127.0.0.1", target))
        except OSError as e:
            emit("c%d cannot reach the target: %s" % (n, e))
            h.close()
            continue
        for s in (h, t):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        emit("c%d open from %s:%d" % (n, addr[0], addr[1]))

        def run(h=h, t=t, c=c):
            a = threading.Thread(target=pump, args=(h, t, c, on_host_pdu, t), daemon=True)
            a.start()
            pump(t, h, c, on_target_pdu, h)
            a.join()
            for cid, (name, d) in sorted(c.pending.items()):
                emit("c%d q%s %s %s -> no response before close" % (c.n, c.qid, name, d))
            io = " ".join("%s=%d" % kv for kv in sorted(c.io_count.items()))
            emit("c%d closed (q%s)%s" % (c.n, c.qid, " successful I/O: " + io if io else ""))
            h.close()
            t.close()

        threading.Thread(target=run, daemon=True).start()


def main():
    global out, show_data
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("listen", type=int)
    ap.add_argument("target", type=int)
    ap.add_argument("--out")
    ap.add_argument("--data", action="store_true", help="print every PDU and every I/O command")
    a = ap.parse_args()
    show_data = a.data
    if a.out:
        out = open(a.out, "w")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(a.listen, a.target)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
