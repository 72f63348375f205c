//! An NVMe/TCP queue pair, host side (SPDK's `nvme_tcp.c`): one non-blocking socket, polled.
//!
//! Commands sit in fixed slots (the command identifier is the slot), each with the caller's token and data
//! buffers. Writes up to the in-capsule limit travel in the command capsule; larger ones wait for the
//! controller's R2T and go out in H2C data PDUs; read data arrives in C2H data PDUs and is copied into the
//! command's buffers at the offset the PDU names, after checking it against the command. Everything the
//! controller sends is checked before use: a PDU that breaks the protocol fails the queue pair (its commands
//! complete with "aborted, SQ deleted") rather than touching memory it should not.
//!
//! The receive buffer holds one whole PDU of the largest transfer the host asks for, the send buffer grows to the
//! largest burst once; after that, nothing on this path allocates.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nvme_proto::cmd::{psdt, sgl, Cqe, SglDesc, Sqe};
use nvme_proto::crc32c::crc32c;
use nvme_proto::status::{generic, Status};
use nvme_proto::tcp::{
    check_header, flags, pdu_type, Ch, DataHdr, IcReq, IcResp, CAPSULE_CMD_HLEN, CH_LEN, DATA_HLEN,
    DIGEST_LEN, IC_HLEN,
};

use crate::sock;
use nvme_tls::{Conn, TlsPsk, TlsStream};

use nvme_proto::host::{command_data, report_expired, CmdTimeout};
pub use nvme_proto::host::{Dir, Iov, SubmitError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Connecting,
    /// TLS handshake (a PSK was given).
    Tls,
    AwaitIcResp,
    Ready,
    Failed,
}

struct Slot {
    busy: bool,
    token: u64,
    iovs: Vec<Iov>,
    len: u32,
    dir: Dir,
    /// C2H data received so far (in order).
    recv: u32,
    /// Some of its C2H data failed the data digest: it completes with a transient transport error.
    digest_error: bool,
    /// A Fabrics command (Authentication Receive): the controller may send less than the buffer holds, its
    /// last data PDU completing it (SPDK's target sends just the message). Reads must be whole.
    short_ok: bool,
    /// When it times out (commands timeouts on), until reported once.
    deadline: Option<Instant>,
}

/// An NVMe/TCP queue pair.
pub struct TcpQpair {
    conn: Conn,
    phase: Phase,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    tx: Vec<u8>,
    tx_off: usize,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Largest write sent in the capsule.
    icd_max: u32,
    /// Controller PDU data alignment (0's based dwords), from ICResp.
    cpda: u8,
    /// Largest H2C data PDU the controller takes, from ICResp.
    maxh2cdata: u32,
    /// Largest transfer of one command.
    max_xfer: u32,
    /// Digests asked for (header, data).
    want_digests: (bool, bool),
    /// Header digests in use (granted by ICResp).
    hdgst: bool,
    /// Data digests in use.
    ddgst: bool,
    /// The command timeout.
    timeout: CmdTimeout,
    error: Option<String>,
}

impl TcpQpair {
    /// Starts connecting to `addr`: `depth` command slots, writes up to `icd_max` bytes in the capsule, at most
    /// `max_xfer` bytes per command, header and data digests as `digests` asks (when the controller grants
    /// them), over TLS with `tls` when given, the socket's `TCP_USER_TIMEOUT` set to `user_timeout_ms` (0: not
    /// set). The connection (TLS handshake, ICReq/ICResp) completes in [`TcpQpair::poll`].
    pub fn connect(
        addr: SocketAddr,
        depth: u16,
        icd_max: u32,
        max_xfer: u32,
        digests: (bool, bool),
        tls: Option<&TlsPsk>,
        user_timeout_ms: u32,
    ) -> std::io::Result<TcpQpair> {
        let sock = sock::start_connect(addr, user_timeout_ms)?;
        let conn = match tls {
            Some(p) => Conn::Tls(Box::new(TlsStream::client(sock, p.clone()))),
            None => Conn::Plain(sock),
        };
        let slots = (0..depth)
            .map(|_| Slot {
                busy: false,
                token: 0,
                iovs: Vec::with_capacity(4),
                len: 0,
                dir: Dir::None,
                recv: 0,
                digest_error: false,
                short_ok: false,
                deadline: None,
            })
            .collect();
        Ok(TcpQpair {
            conn,
            phase: Phase::Connecting,
            // A whole C2H data PDU of the largest transfer, plus headers and padding.
            rx: vec![0u8; max_xfer as usize + 4096].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            tx: Vec::with_capacity(64 * 1024),
            tx_off: 0,
            slots,
            free: (0..depth).rev().collect(),
            icd_max,
            cpda: 0,
            maxh2cdata: 0,
            max_xfer,
            want_digests: digests,
            hdgst: false,
            ddgst: false,
            timeout: CmdTimeout::default(),
            error: None,
        })
    }

    /// Connected and past ICResp: commands may go.
    pub fn ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// Why the queue pair failed, once it has.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Commands submitted and not completed.
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Sends command `sqe` (its command identifier and data pointer are set here) with data `iovs` moving as
    /// `dir`; its completion is reported by [`TcpQpair::poll`] with `token`.
    ///
    /// # Safety
    /// The iovecs must stay valid (writable for [`Dir::FromCtrl`]) and not be otherwise accessed until the
    /// command completes or the queue pair is dropped.
    pub unsafe fn submit(
        &mut self,
        mut sqe: Sqe,
        iovs: &[Iov],
        dir: Dir,
        token: u64,
    ) -> Result<(), SubmitError> {
        if self.phase != Phase::Ready {
            return Err(SubmitError::NotReady);
        }
        let (iovs, len) = command_data(iovs, dir, self.max_xfer)?;
        let Some(cid) = self.free.pop() else {
            return Err(SubmitError::Full);
        };
        let in_capsule = dir == Dir::ToCtrl && len <= self.icd_max as usize && len > 0;
        sqe.set_cid(cid);
        // No fused pairs here: a command passed through from elsewhere must not carry a FUSE bit whose partner
        // never comes. The data pointer is this queue pair's own.
        sqe.set_flags(0, psdt::SGL_MPTR_CONTIG);
        sqe.set_sgl1(&SglDesc {
            addr: 0,
            len: len as u32,
            key: 0,
            ty: if in_capsule {
                sgl::TYPE_DATA_BLOCK
            } else {
                sgl::TYPE_TRANSPORT_DATA_BLOCK
            },
            subtype: if in_capsule {
                sgl::SUBTYPE_OFFSET
            } else {
                sgl::SUBTYPE_TRANSPORT
            },
        });
        let s = &mut self.slots[cid as usize];
        s.busy = true;
        s.token = token;
        s.iovs.clear();
        if dir != Dir::None {
            s.iovs.extend_from_slice(iovs);
        }
        s.len = len as u32;
        s.dir = dir;
        s.recv = 0;
        s.digest_error = false;
        s.short_ok = sqe.opc() == nvme_proto::cmd::FABRICS;
        s.deadline = self.timeout.deadline(sqe.opc());
        // The capsule: header (and its digest), then (aligned as the controller asked) in-capsule data (and its
        // digest).
        let hend = CAPSULE_CMD_HLEN + self.hdgst_len();
        let (pdo, plen) = if in_capsule {
            let pdo = hend.next_multiple_of((self.cpda as usize + 1) * 4);
            (pdo, pdo + len + self.ddgst_len())
        } else {
            (0, hend)
        };
        let fl = self.pdu_flags(in_capsule);
        let at = self.tx.len();
        self.tx.resize(at + plen, 0);
        let b = &mut self.tx[at..at + plen];
        Ch {
            ty: pdu_type::CAPSULE_CMD,
            flags: fl,
            hlen: CAPSULE_CMD_HLEN as u8,
            pdo: pdo as u8,
            plen: plen as u32,
        }
        .encode(b);
        b[CH_LEN..CAPSULE_CMD_HLEN].copy_from_slice(&sqe.0);
        if in_capsule {
            // SAFETY: the caller keeps the iovecs valid for reads (submit contract).
            unsafe { gather(&self.slots[cid as usize].iovs, 0, &mut b[pdo..pdo + len]) };
        }
        self.seal(at, CAPSULE_CMD_HLEN, in_capsule.then_some((pdo, len)));
        // Sent by the next poll, with whatever else is submitted before it: one send per batch, not per
        // command.
        Ok(())
    }

    /// Moves the queue pair on: finishes connecting, reads and handles what the controller sent (completions
    /// go to `done` with their tokens), writes what is queued. Returns whether anything happened. When the
    /// queue pair fails, every command still in it completes with "aborted, SQ deleted".
    pub fn poll(&mut self, done: &mut dyn FnMut(u64, Cqe)) -> bool {
        match self.phase {
            Phase::Failed => false,
            Phase::Connecting => match sock::connected(self.conn.sock()) {
                Ok(false) => false,
                Ok(true) => {
                    if let Conn::Tls(_) = self.conn {
                        self.phase = Phase::Tls;
                        return self.poll(done);
                    }
                    self.send_icreq();
                    true
                }
                Err(e) => {
                    self.fail(format!("connect: {e}"), done);
                    true
                }
            },
            Phase::Tls => {
                let Conn::Tls(t) = &mut self.conn else {
                    return false;
                };
                match t.handshake() {
                    Ok(false) => false,
                    Ok(true) => {
                        self.send_icreq();
                        true
                    }
                    Err(e) => {
                        self.fail(format!("TLS handshake: {e}"), done);
                        true
                    }
                }
            }
            Phase::AwaitIcResp | Phase::Ready => {
                let mut did = self.flush();
                match self.read_pdus(done) {
                    Ok(d) => did |= d,
                    Err(e) => {
                        self.fail(e, done);
                        return true;
                    }
                }
                did | self.flush()
            }
        }
    }

    /// Queues ICReq and starts sending it.
    fn send_icreq(&mut self) {
        let mut b = [0u8; IC_HLEN];
        IcReq {
            pfv: 0,
            hpda: 0,
            hdgst: self.want_digests.0,
            ddgst: self.want_digests.1,
            maxr2t: 0,
        }
        .encode(&mut b);
        self.tx.extend_from_slice(&b);
        self.phase = Phase::AwaitIcResp;
        self.flush();
    }

    /// Sets how long a command may be outstanding before [`TcpQpair::expired`] reports it (commands sent from
    /// now on); commands of opcode `untimed_opc` are never reported (an admin queue's Asynchronous Event
    /// Requests wait for events, as long as it takes).
    pub fn set_timeout(&mut self, t: Option<Duration>, untimed_opc: Option<u8>) {
        self.timeout.set(t, untimed_opc);
    }

    /// Reports, once each, the commands outstanding past their deadline at `now`: (command id, token).
    pub fn expired(&mut self, now: Instant, f: &mut dyn FnMut(u16, u64)) {
        let slots = self
            .slots
            .iter_mut()
            .map(|s| (s.busy, &mut s.deadline, s.token));
        report_expired(slots, now, f);
    }

    /// Closes the connection; commands still in it complete with "aborted, SQ deleted".
    pub fn close(&mut self, done: &mut dyn FnMut(u64, Cqe)) {
        self.conn.shutdown();
        self.fail("closed by the host".into(), done);
    }

    fn fail(&mut self, why: String, done: &mut dyn FnMut(u64, Cqe)) {
        if self.phase == Phase::Failed {
            return;
        }
        log::debug!("nvme_tcp qpair: {why}");
        self.phase = Phase::Failed;
        self.error = Some(why);
        let _ = self.conn.sock().shutdown(std::net::Shutdown::Both);
        for cid in 0..self.slots.len() {
            if self.slots[cid].busy {
                let token = self.slots[cid].token;
                self.release(cid as u16);
                done(token, aborted(cid as u16));
            }
        }
    }

    fn release(&mut self, cid: u16) {
        let s = &mut self.slots[cid as usize];
        s.busy = false;
        s.iovs.clear();
        self.free.push(cid);
    }

    /// Writes what is queued; whether anything went out.
    fn flush(&mut self) -> bool {
        let mut did = false;
        while self.tx_off < self.tx.len() {
            match self.conn.write(&self.tx[self.tx_off..]) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_off += n;
                    did = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.error = Some(format!("send: {e}"));
                    break;
                }
            }
        }
        if self.tx_off == self.tx.len() {
            self.tx.clear();
            self.tx_off = 0;
        }
        // TLS keeps what the socket did not take; it goes out from here on later polls.
        if let Err(e) = self.conn.flush() {
            self.error.get_or_insert_with(|| format!("send: {e}"));
        }
        did
    }

    /// Reads and handles whole PDUs.
    fn read_pdus(&mut self, done: &mut dyn FnMut(u64, Cqe)) -> Result<bool, String> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let mut did = false;
        loop {
            did |= self.handle_buffered(done)?;
            // Room for the rest of a partial PDU: move it to the front.
            if self.rx_start > 0 {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            let room = self.rx.len() - self.rx_end;
            match self.conn.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => return Err("the controller closed the connection".into()),
                Ok(n) => {
                    self.rx_end += n;
                    did = true;
                    if n < room {
                        // Less than the room: the socket is drained for now (no second call to hear EAGAIN).
                        self.handle_buffered(done)?;
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(did),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("receive: {e}")),
            }
        }
    }

    /// Handles every whole PDU in the receive buffer; whether there was one.
    fn handle_buffered(&mut self, done: &mut dyn FnMut(u64, Cqe)) -> Result<bool, String> {
        let mut did = false;
        while self.rx_end - self.rx_start >= CH_LEN {
            let ch = Ch::decode(&self.rx[self.rx_start..]);
            let plen = ch.plen as usize;
            if plen < CH_LEN || plen > self.rx.len() {
                return Err(format!("PDU length {plen} (type {:#x})", ch.ty));
            }
            if self.rx_end - self.rx_start < plen {
                break;
            }
            let start = self.rx_start;
            self.rx_start += plen;
            self.handle(ch, start, done)?;
            did = true;
        }
        Ok(did)
    }

    /// Handles one PDU of `ch.plen` bytes at `rx[at..]`.
    fn handle(&mut self, ch: Ch, at: usize, done: &mut dyn FnMut(u64, Cqe)) -> Result<(), String> {
        let plen = ch.plen as usize;
        let allowed: &[u8] = match self.phase {
            Phase::AwaitIcResp => &[pdu_type::IC_RESP, pdu_type::C2H_TERM_REQ],
            _ => &[
                pdu_type::CAPSULE_RESP,
                pdu_type::C2H_DATA,
                pdu_type::R2T,
                pdu_type::C2H_TERM_REQ,
            ],
        };
        let l =
            check_header(&ch, allowed, self.hdgst, self.ddgst, 0, self.rx.len()).map_err(|e| {
                format!(
                    "PDU type {:#x} flags {:#x} hlen {} pdo {} plen {plen}: bad header ({e:?})",
                    ch.ty, ch.flags, ch.hlen, ch.pdo
                )
            })?;
        let pdu = &self.rx[at..at + plen];
        if l.hdgst {
            let want = crc32c(&pdu[..l.hlen]);
            let got = u32::from_le_bytes(
                pdu[l.hlen..l.hlen + DIGEST_LEN]
                    .try_into()
                    .unwrap_or_default(),
            );
            if got != want {
                return Err(format!("header digest {got:#010x}, expected {want:#010x}"));
            }
        }
        // A data digest that fails spoils only its command (completed with a transient transport error, which
        // the bdev layer above retries), not the connection.
        let data_ok = !l.ddgst || {
            let end = l.data_off + l.data_len;
            crc32c(&pdu[l.data_off..end])
                == u32::from_le_bytes(pdu[end..end + DIGEST_LEN].try_into().unwrap_or_default())
        };
        match (self.phase, ch.ty) {
            (Phase::AwaitIcResp, pdu_type::IC_RESP) => {
                let r = IcResp::decode(pdu);
                // A digest granted that was not asked for breaks the negotiation; one refused is simply off.
                if r.pfv != 0
                    || (r.hdgst && !self.want_digests.0)
                    || (r.ddgst && !self.want_digests.1)
                    || r.cpda > 31
                    || r.maxh2cdata < 4096
                {
                    return Err(format!("ICResp not as asked: {r:?}"));
                }
                self.cpda = r.cpda;
                self.maxh2cdata = r.maxh2cdata;
                self.hdgst = r.hdgst;
                self.ddgst = r.ddgst;
                self.phase = Phase::Ready;
                Ok(())
            }
            (Phase::Ready, pdu_type::CAPSULE_RESP) => {
                let mut c = [0u8; 16];
                c.copy_from_slice(&pdu[CH_LEN..CH_LEN + 16]);
                let mut cqe = Cqe::decode(&c);
                let s = self.busy_slot(cqe.cid)?;
                let token = s.token;
                if s.digest_error && cqe.status.is_success() {
                    cqe.status = transient(cqe.cid).status;
                }
                self.release(cqe.cid);
                done(token, cqe);
                Ok(())
            }
            (Phase::Ready, pdu_type::C2H_DATA) => {
                let d = DataHdr::decode(pdu);
                let pdo = l.data_off;
                if d.len as usize != l.data_len {
                    return Err(format!("C2HData {d:?} with {} data bytes", l.data_len));
                }
                let s = self.busy_slot(d.cccid)?;
                if s.dir != Dir::FromCtrl
                    || d.offset != s.recv
                    || d.offset as u64 + d.len as u64 > s.len as u64
                {
                    return Err(format!(
                        "C2HData {d:?} for a command of {} bytes ({:?}, {} received)",
                        s.len, s.dir, s.recv
                    ));
                }
                // SAFETY: the slot's iovecs are writable until its command completes (submit contract), and
                // offset + len is within them (checked above).
                unsafe { scatter(&s.iovs, d.offset as usize, &pdu[pdo..pdo + d.len as usize]) };
                let s = &mut self.slots[d.cccid as usize];
                s.recv += d.len;
                if !data_ok {
                    log::warn!("nvme_tcp: C2H data digest error on command {}", d.cccid);
                    s.digest_error = true;
                }
                if ch.flags & flags::SUCCESS != 0 {
                    if ch.flags & flags::LAST_PDU == 0 || (s.recv != s.len && !s.short_ok) {
                        return Err("C2HData SUCCESS before the last data".into());
                    }
                    let token = s.token;
                    let cqe = if s.digest_error {
                        transient(d.cccid)
                    } else {
                        Cqe {
                            cid: d.cccid,
                            ..Default::default()
                        }
                    };
                    self.release(d.cccid);
                    done(token, cqe);
                }
                Ok(())
            }
            (Phase::Ready, pdu_type::R2T) => {
                let d = DataHdr::decode(pdu);
                let s = self.busy_slot(d.cccid)?;
                if s.dir != Dir::ToCtrl
                    || d.len == 0
                    || d.offset as u64 + d.len as u64 > s.len as u64
                {
                    return Err(format!("R2T {d:?} for a command of {} bytes", s.len));
                }
                self.send_h2c(d);
                Ok(())
            }
            (_, pdu_type::C2H_TERM_REQ) => {
                let (fes, fei) = nvme_proto::tcp::decode_term_req(pdu);
                Err(format!(
                    "the controller ended the connection: FES {fes:#x} FEI {fei:#x}"
                ))
            }
            (p, t) => Err(format!("unexpected PDU type {t:#x} in phase {p:?}")),
        }
    }

    fn busy_slot(&self, cid: u16) -> Result<&Slot, String> {
        match self.slots.get(cid as usize) {
            Some(s) if s.busy => Ok(s),
            _ => Err(format!("PDU for command {cid}, which is not outstanding")),
        }
    }

    /// Queues the data an R2T asked for, in H2C data PDUs of at most MAXH2CDATA bytes.
    fn send_h2c(&mut self, r2t: DataHdr) {
        let (mut off, end) = (r2t.offset, r2t.offset + r2t.len);
        let pdo = (DATA_HLEN + self.hdgst_len()).next_multiple_of((self.cpda as usize + 1) * 4);
        while off < end {
            let n = (end - off).min(self.maxh2cdata);
            let last = off + n == end;
            let plen = pdo + n as usize + self.ddgst_len();
            let at = self.tx.len();
            self.tx.resize(at + plen, 0);
            let fl = self.pdu_flags(true) | if last { flags::LAST_PDU } else { 0 };
            let b = &mut self.tx[at..at + plen];
            DataHdr {
                cccid: r2t.cccid,
                ttag: r2t.ttag,
                offset: off,
                len: n,
            }
            .encode(pdu_type::H2C_DATA, fl, pdo as u8, plen as u32, b);
            // SAFETY: the slot's iovecs are readable until its command completes (submit contract); the range
            // was checked against the command's length.
            unsafe {
                gather(
                    &self.slots[r2t.cccid as usize].iovs,
                    off as usize,
                    &mut b[pdo..pdo + n as usize],
                )
            };
            self.seal(at, DATA_HLEN, Some((pdo, n as usize)));
            off += n;
        }
    }

    /// Bytes of a header digest on this connection.
    fn hdgst_len(&self) -> usize {
        if self.hdgst {
            DIGEST_LEN
        } else {
            0
        }
    }

    /// Bytes of a data digest on this connection.
    fn ddgst_len(&self) -> usize {
        if self.ddgst {
            DIGEST_LEN
        } else {
            0
        }
    }

    /// The digest flags of a PDU sent here (`data`: it carries data).
    fn pdu_flags(&self, data: bool) -> u8 {
        (if self.hdgst { flags::HDGSTF } else { 0 })
            | (if self.ddgst && data { flags::DDGSTF } else { 0 })
    }

    /// Writes the digests of the PDU queued at `tx[at..]` with an `hlen`-byte header and `data` (offset in
    /// the PDU, length), as this connection negotiated them.
    fn seal(&mut self, at: usize, hlen: usize, data: Option<(usize, usize)>) {
        let b = &mut self.tx[at..];
        if self.hdgst {
            let d = crc32c(&b[..hlen]);
            b[hlen..hlen + DIGEST_LEN].copy_from_slice(&d.to_le_bytes());
        }
        if let Some((off, len)) = data.filter(|_| self.ddgst) {
            let d = crc32c(&b[off..off + len]);
            b[off + len..off + len + DIGEST_LEN].copy_from_slice(&d.to_le_bytes());
        }
    }
}

/// The completion of a command whose data failed its digest (SPDK's transient transport error).
fn transient(cid: u16) -> Cqe {
    let mut c = Cqe {
        cid,
        ..Default::default()
    };
    c.status = Status {
        sct: nvme_proto::status::sct::GENERIC,
        sc: generic::TRANSIENT_TRANSPORT_ERROR,
        ..Default::default()
    };
    c
}

/// The completion a command gets when its queue pair goes away under it.
fn aborted(cid: u16) -> Cqe {
    Cqe {
        cid,
        status: Status::generic(generic::ABORTED_SQ_DELETION),
        ..Default::default()
    }
}

/// Calls `f(address, position in the range, length)` for each piece of the `len` bytes of `iovs` that start `off`
/// bytes in (the walk [`gather`] and [`scatter`] share).
fn pieces(iovs: &[Iov], mut off: usize, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) {
    let mut done = 0;
    for v in iovs {
        if done == len {
            break;
        }
        if off >= v.len {
            off -= v.len;
            continue;
        }
        let n = (v.len - off).min(len - done);
        f(v.base.wrapping_add(off), done, n);
        done += n;
        off = 0;
    }
}

/// Copies `out.len()` bytes of `iovs`, starting `off` bytes in, into `out`.
///
/// # Safety
/// The iovecs must be valid for reads and hold at least `off + out.len()` bytes.
unsafe fn gather(iovs: &[Iov], off: usize, out: &mut [u8]) {
    pieces(iovs, off, out.len(), |p, at, n| {
        // SAFETY: `p` is `n` bytes inside a readable iovec (caller's contract); `out` is a distinct slice and
        // `at + n <= out.len()`.
        unsafe { std::ptr::copy_nonoverlapping(p, out[at..].as_mut_ptr(), n) }
    });
}

/// Copies `data` into `iovs` starting `off` bytes in.
///
/// # Safety
/// The iovecs must be valid for writes and hold at least `off + data.len()` bytes.
unsafe fn scatter(iovs: &[Iov], off: usize, data: &[u8]) {
    pieces(iovs, off, data.len(), |p, at, n| {
        // SAFETY: `p` is `n` bytes inside a writable iovec (caller's contract); `data` is a distinct slice and
        // `at + n <= data.len()`.
        unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), p, n) }
    });
}
