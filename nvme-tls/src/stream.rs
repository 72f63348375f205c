//! A TLS 1.3 connection over a non-blocking TCP socket, polled: the handshake moves on each time it is asked
//! to, and reads and writes never wait (`WouldBlock` as the socket's own). Records are decrypted in place in the
//! receive buffer and copied once into the caller's; writes are sealed into a send buffer that grows to the
//! largest burst once. After the handshake nothing allocates.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;

use x25519_dalek::{PublicKey, StaticSecret};

use crate::crypto::{Keys, Suite, Transcript, TAG_LEN};
use crate::handshake::{self as hs, alert, fail, ty, Fail};
use crate::psk::TlsPsk;

/// Record content types.
mod ct {
    pub const CHANGE_CIPHER_SPEC: u8 = 20;
    pub const ALERT: u8 = 21;
    pub const HANDSHAKE: u8 = 22;
    pub const APPLICATION_DATA: u8 = 23;
}

/// Largest plaintext in one record.
const MAX_PLAIN: usize = 16 * 1024;
/// Largest record on the wire: header, plaintext, content type, padding allowance and tag (RFC 8446 5.2).
const MAX_RECORD: usize = 5 + MAX_PLAIN + 256;
/// Sealed bytes waiting for the socket past which `write` takes no more.
const TX_HIGH: usize = 256 * 1024;
/// Records sent under one key before it is updated: well inside AES-GCM's 2^24.5 (RFC 8446 section 5.5).
const REKEY_AFTER: u64 = 1 << 24;

/// Finds the TLS PSK for an identity a client offers (`None`: unknown identity).
pub type PskLookup = Box<dyn FnMut(&[u8]) -> Option<TlsPsk> + Send>;

enum State {
    /// Client: ClientHello to be sent.
    ClientStart {
        psk: TlsPsk,
    },
    /// Client: waiting for ServerHello.
    WaitServerHello {
        psk: TlsPsk,
        secret: StaticSecret,
        session_id: [u8; 32],
        transcript: Transcript,
    },
    /// Client: waiting for EncryptedExtensions, then Finished.
    WaitServerFinished {
        suite: Suite,
        ee_seen: bool,
        transcript: Transcript,
        handshake_secret: Vec<u8>,
        client_hs: Vec<u8>,
        server_hs: Vec<u8>,
    },
    /// Server: waiting for ClientHello.
    WaitClientHello {
        lookup: PskLookup,
    },
    /// Server: waiting for the client's Finished.
    WaitClientFinished {
        suite: Suite,
        transcript: Transcript,
        client_hs: Vec<u8>,
        client_ap: Vec<u8>,
    },
    Established,
    Failed,
}

/// A TLS 1.3 PSK connection, client or server.
pub struct TlsStream {
    sock: TcpStream,
    state: State,
    /// The suite in use, once chosen.
    suite: Option<Suite>,
    /// The identity the handshake used (the server learns it from the client).
    identity: Vec<u8>,
    rd: Option<Keys>,
    wr: Option<Keys>,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    /// Decrypted application data in `rx` not yet handed out.
    pt: (usize, usize),
    /// Handshake bytes received but not yet a whole message.
    hs_in: Vec<u8>,
    tx: Vec<u8>,
    tx_off: usize,
    /// The peer sent close_notify.
    closed: bool,
    error: Option<String>,
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    // The OS random source does not fail on Linux once booted; a failure here must not weaken the keys.
    getrandom::fill(&mut b).expect("random bytes from the OS");
    b
}

fn err(kind: ErrorKind, why: impl Into<String>) -> io::Error {
    io::Error::new(kind, why.into())
}

impl TlsStream {
    /// A client connection over `sock` (connected, or still connecting: nothing is sent before
    /// [`TlsStream::handshake`]) offering `psk`.
    pub fn client(sock: TcpStream, psk: TlsPsk) -> TlsStream {
        let id = psk.identity.clone().into_bytes();
        TlsStream::new(sock, State::ClientStart { psk }, id)
    }

    /// A server connection over accepted `sock`; `lookup` gives the PSK of an identity the client offers.
    pub fn server(sock: TcpStream, lookup: PskLookup) -> TlsStream {
        TlsStream::new(sock, State::WaitClientHello { lookup }, Vec::new())
    }

    fn new(sock: TcpStream, state: State, identity: Vec<u8>) -> TlsStream {
        TlsStream {
            sock,
            state,
            suite: None,
            identity,
            rd: None,
            wr: None,
            rx: vec![0u8; 2 * MAX_RECORD].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            pt: (0, 0),
            hs_in: Vec::new(),
            tx: Vec::with_capacity(64 * 1024),
            tx_off: 0,
            closed: false,
            error: None,
        }
    }

    /// The socket underneath.
    pub fn sock(&self) -> &TcpStream {
        &self.sock
    }

    /// The PSK identity in use (the server knows it once ClientHello arrived).
    pub fn identity(&self) -> &[u8] {
        &self.identity
    }

    /// The negotiated suite, once chosen.
    pub fn suite(&self) -> Option<Suite> {
        self.suite
    }

    /// Whether the handshake is done.
    pub fn established(&self) -> bool {
        matches!(self.state, State::Established)
    }

    /// Moves the handshake on as far as the peer's data allows: `Ok(true)` once established, `Ok(false)` while
    /// it waits, an error (an alert was sent) when it failed.
    pub fn handshake(&mut self) -> io::Result<bool> {
        if let State::Failed = self.state {
            return Err(err(ErrorKind::ConnectionAborted, self.failure()));
        }
        if let State::ClientStart { .. } = self.state {
            self.send_client_hello();
        }
        self.flush()?;
        while !self.established() {
            match self.next_record()? {
                Some(()) => {}
                None => break,
            }
        }
        self.flush()?;
        Ok(self.established())
    }

    fn failure(&self) -> String {
        self.error.clone().unwrap_or_else(|| "TLS failed".into())
    }

    /// Reads decrypted application data: `WouldBlock` when none is there yet, `Ok(0)` after the peer's
    /// close_notify.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        loop {
            if self.pt.0 < self.pt.1 {
                let k = (self.pt.1 - self.pt.0).min(buf.len() - n);
                buf[n..n + k].copy_from_slice(&self.rx[self.pt.0..self.pt.0 + k]);
                self.pt.0 += k;
                n += k;
                if n == buf.len() {
                    return Ok(n);
                }
            }
            if self.closed {
                return Ok(n);
            }
            match self.next_record() {
                Ok(Some(())) => {}
                Ok(None) if n > 0 => return Ok(n),
                Ok(None) => return Err(ErrorKind::WouldBlock.into()),
                Err(e) if n > 0 && e.kind() != ErrorKind::WouldBlock => {
                    // Hand out what was decrypted; the error comes back on the next call.
                    self.error.get_or_insert_with(|| e.to_string());
                    return Ok(n);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Seals up to [`TX_HIGH`] bytes of `buf` into records and starts sending them; `WouldBlock` while that
    /// much is still waiting for the socket. Call [`TlsStream::flush`] until [`TlsStream::pending`] is false.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[std::io::IoSlice::new(buf)])
    }

    /// Like [`TlsStream::write`] for several buffers: they are sealed together into full records.
    pub fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> io::Result<usize> {
        if !self.established() {
            return Err(err(ErrorKind::NotConnected, "TLS handshake not done"));
        }
        self.flush()?;
        if self.tx.len() - self.tx_off >= TX_HIGH {
            return Err(ErrorKind::WouldBlock.into());
        }
        // Gather into the send buffer record by record, then seal each in place.
        let mut taken = 0;
        let mut pieces = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut cur: &[u8] = &[];
        while taken < TX_HIGH {
            let start = self.tx.len();
            self.tx.extend_from_slice(&[0; 5]);
            let mut n = 0;
            while n < MAX_PLAIN && taken + n < TX_HIGH {
                if cur.is_empty() {
                    match pieces.next() {
                        Some(p) => cur = p,
                        None => break,
                    }
                }
                let k = cur.len().min(MAX_PLAIN - n).min(TX_HIGH - taken - n);
                self.tx.extend_from_slice(&cur[..k]);
                cur = &cur[k..];
                n += k;
            }
            if n == 0 {
                self.tx.truncate(start);
                break;
            }
            self.seal_typed(start, n, ct::APPLICATION_DATA);
            taken += n;
        }
        self.flush()?;
        Ok(taken)
    }

    /// Whether sealed bytes still wait for the socket.
    pub fn pending(&self) -> bool {
        self.tx_off < self.tx.len()
    }

    /// Whether received data is buffered here (decrypted, or a whole record already read from the socket),
    /// which a poller waiting on socket readiness would not see. A partial record is not: the socket says when
    /// the rest comes.
    pub fn buffered(&self) -> bool {
        let avail = self.rx_end - self.rx_start;
        let whole = avail >= 5 && {
            let h = &self.rx[self.rx_start..];
            avail >= 5 + u16::from_be_bytes([h[3], h[4]]) as usize
        };
        self.pt.0 < self.pt.1 || whole
    }

    /// Sends what is sealed, as far as the socket takes it.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.tx_off < self.tx.len() {
            match (&self.sock).write(&self.tx[self.tx_off..]) {
                Ok(0) => return Err(err(ErrorKind::WriteZero, "send: connection closed")),
                Ok(n) => self.tx_off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.tx.clear();
        self.tx_off = 0;
        Ok(())
    }

    /// Sends close_notify (best effort) and shuts the socket down.
    pub fn close(&mut self) {
        if self.established() {
            self.send_alert(0);
            let _ = self.flush();
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Appends one record of `ty` holding `data`, sealed when write keys are in place.
    fn seal(&mut self, ty: u8, data: &[u8]) {
        let start = self.tx.len();
        match &mut self.wr {
            None => {
                // Plaintext records: the first ClientHello says 0x0301 for old middleboxes.
                let v: u16 = if ty == ct::HANDSHAKE && data.first() == Some(&ty::CLIENT_HELLO) {
                    0x0301
                } else {
                    0x0303
                };
                self.tx.push(ty);
                self.tx.extend_from_slice(&v.to_be_bytes());
                self.tx
                    .extend_from_slice(&(data.len() as u16).to_be_bytes());
                self.tx.extend_from_slice(data);
            }
            Some(_) => {
                self.tx.extend_from_slice(&[0; 5]);
                self.tx.extend_from_slice(data);
                self.seal_typed(start, data.len(), ty);
            }
        }
    }

    /// Seals the record at `tx[start..]` (a header's room, then `n` bytes of content of type `ty`) with the
    /// write keys: appends the inner type and the tag, and fills the header in.
    fn seal_typed(&mut self, start: usize, n: usize, ty: u8) {
        let Some(k) = self.wr.as_mut() else {
            return;
        };
        let len = (n + 1 + TAG_LEN) as u16;
        let hdr = [ct::APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        self.tx[start..start + 5].copy_from_slice(&hdr);
        self.tx.push(ty);
        let tag = k.seal(&hdr, &mut self.tx[start + 5..]);
        self.tx.extend_from_slice(&tag);
        if k.seq() >= REKEY_AFTER && ty == ct::APPLICATION_DATA {
            self.update_write_keys();
        }
    }

    /// Sends KeyUpdate (no update asked of the peer) and moves to the next write keys.
    fn update_write_keys(&mut self) {
        let m = hs::message(ty::KEY_UPDATE, &[0]);
        self.seal(ct::HANDSHAKE, &m);
        self.wr = self.wr.as_ref().map(Keys::updated);
    }

    fn send_alert(&mut self, desc: u8) {
        // close_notify is a warning (1); everything else we send is fatal (2).
        let level = if desc == 0 { 1 } else { 2 };
        self.seal(ct::ALERT, &[level, desc]);
    }

    /// Fails the connection with `f`: sends its alert and remembers why.
    fn abort(&mut self, f: Fail) -> io::Error {
        log::debug!("TLS: {} (alert {})", f.why, f.alert);
        if self.error.is_none() {
            self.send_alert(f.alert);
            let _ = self.flush();
            self.state = State::Failed;
            self.error = Some(format!("TLS: {}", f.why));
        }
        err(ErrorKind::ConnectionAborted, self.failure())
    }

    /// Takes in one whole record if there is one (reading the socket for it): `Ok(None)` when none is there.
    fn next_record(&mut self) -> io::Result<Option<()>> {
        if let Some(e) = self.error.clone() {
            return Err(err(ErrorKind::ConnectionAborted, e));
        }
        loop {
            let avail = self.rx_end - self.rx_start;
            if avail >= 5 {
                let h = &self.rx[self.rx_start..self.rx_start + 5];
                let len = u16::from_be_bytes([h[3], h[4]]) as usize;
                if h[1] != 3 || 5 + len > MAX_RECORD {
                    return Err(self.abort(fail(alert::DECODE_ERROR, "malformed record header")));
                }
                if avail >= 5 + len {
                    let at = self.rx_start;
                    self.rx_start += 5 + len;
                    self.record(at, len)?;
                    return Ok(Some(()));
                }
            }
            // Make room for the rest of the record; decrypted data not handed out yet stays where it is.
            if self.pt.0 >= self.pt.1 && self.rx_start > 0 {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
                self.pt = (0, 0);
            }
            if self.rx_end == self.rx.len() {
                return Ok(None);
            }
            match (&self.sock).read(&mut self.rx[self.rx_end..]) {
                Ok(0) => {
                    return Err(err(
                        ErrorKind::UnexpectedEof,
                        "the peer closed the connection without close_notify",
                    ))
                }
                Ok(n) => self.rx_end += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Handles the record at `rx[at..at + 5 + len]`.
    fn record(&mut self, at: usize, len: usize) -> io::Result<()> {
        let outer = self.rx[at];
        let keyed = self.rd.is_some();
        let (ty, body) = match (outer, keyed) {
            (ct::CHANGE_CIPHER_SPEC, _) if !self.established() => {
                // Middlebox compatibility: one byte 0x01, ignored.
                if len != 1 || self.rx[at + 5] != 1 {
                    return Err(self.abort(fail(alert::UNEXPECTED_MESSAGE, "change_cipher_spec")));
                }
                return Ok(());
            }
            (ct::APPLICATION_DATA, true) => {
                if len < TAG_LEN + 1 {
                    return Err(self.abort(fail(alert::DECODE_ERROR, "short record")));
                }
                let (hdr, rest) = self.rx[at..at + 5 + len].split_at_mut(5);
                let (ctext, tag) = rest.split_at_mut(len - TAG_LEN);
                let opened = self.rd.as_mut().map(|k| k.open(hdr, ctext, tag).is_ok());
                if opened != Some(true) {
                    return Err(
                        self.abort(fail(alert::BAD_RECORD_MAC, "record failed authentication"))
                    );
                }
                // The inner type is the last non-zero byte; zeros after it are padding.
                let inner = &self.rx[at + 5..at + 5 + len - TAG_LEN];
                let Some(p) = inner.iter().rposition(|b| *b != 0) else {
                    return Err(
                        self.abort(fail(alert::UNEXPECTED_MESSAGE, "record without a type"))
                    );
                };
                (inner[p], (at + 5, at + 5 + p))
            }
            (ct::HANDSHAKE | ct::ALERT, false) => (outer, (at + 5, at + 5 + len)),
            _ => {
                return Err(self.abort(fail(
                    alert::UNEXPECTED_MESSAGE,
                    format!("record type {outer}"),
                )))
            }
        };
        match ty {
            ct::APPLICATION_DATA if self.established() => {
                self.pt = body;
                Ok(())
            }
            ct::HANDSHAKE => {
                let data = self.rx[body.0..body.1].to_vec();
                self.hs_in.extend_from_slice(&data);
                self.handshake_messages()
            }
            ct::ALERT => {
                let b = &self.rx[body.0..body.1];
                if b.len() != 2 {
                    return Err(self.abort(fail(alert::DECODE_ERROR, "alert length")));
                }
                if b[1] == 0 {
                    self.closed = true;
                    return Ok(());
                }
                let why = format!("the peer sent alert {}", b[1]);
                self.state = State::Failed;
                self.error = Some(format!("TLS: {why}"));
                Err(err(ErrorKind::ConnectionAborted, format!("TLS: {why}")))
            }
            _ => Err(self.abort(fail(
                alert::UNEXPECTED_MESSAGE,
                format!("content type {ty}"),
            ))),
        }
    }

    /// Handles the whole handshake messages received so far.
    fn handshake_messages(&mut self) -> io::Result<()> {
        while self.hs_in.len() >= 4 {
            let len = u32::from_be_bytes([0, self.hs_in[1], self.hs_in[2], self.hs_in[3]]) as usize;
            if len > MAX_PLAIN * 4 {
                return Err(self.abort(fail(alert::DECODE_ERROR, "handshake message too long")));
            }
            if self.hs_in.len() < 4 + len {
                break;
            }
            let msg: Vec<u8> = self.hs_in.drain(..4 + len).collect();
            if let Err(f) = self.message(&msg) {
                return Err(self.abort(f));
            }
        }
        Ok(())
    }

    /// Handles one handshake message (header included).
    fn message(&mut self, msg: &[u8]) -> Result<(), Fail> {
        let t = msg[0];
        let body = &msg[4..];
        match std::mem::replace(&mut self.state, State::Failed) {
            State::WaitServerHello {
                psk,
                secret,
                session_id,
                mut transcript,
            } if t == ty::SERVER_HELLO => {
                let sh = hs::parse_server_hello(body, psk.suite, &session_id)?;
                let shared = secret.diffie_hellman(&PublicKey::from(sh.share));
                if !shared.was_contributory() {
                    return Err(fail(alert::ILLEGAL_PARAMETER, "degenerate x25519 share"));
                }
                transcript.update(msg);
                let s = psk.suite;
                let (hsec, client_hs, server_hs) =
                    handshake_secrets(s, &psk.key, shared.as_bytes(), &transcript.current());
                self.rd = Some(Keys::new(s, server_hs.clone()));
                self.state = State::WaitServerFinished {
                    suite: s,
                    ee_seen: false,
                    transcript,
                    handshake_secret: hsec,
                    client_hs,
                    server_hs,
                };
                Ok(())
            }
            State::WaitServerFinished {
                suite,
                ee_seen: false,
                mut transcript,
                handshake_secret,
                client_hs,
                server_hs,
            } if t == ty::ENCRYPTED_EXTENSIONS => {
                hs::parse_encrypted_extensions(body)?;
                transcript.update(msg);
                self.state = State::WaitServerFinished {
                    suite,
                    ee_seen: true,
                    transcript,
                    handshake_secret,
                    client_hs,
                    server_hs,
                };
                Ok(())
            }
            State::WaitServerFinished {
                suite,
                ee_seen: true,
                mut transcript,
                handshake_secret,
                client_hs,
                server_hs,
            } if t == ty::FINISHED => {
                let want = hs::finished_mac(suite, &server_hs, &transcript.current());
                if !crate::crypto::same(&want, body) {
                    return Err(fail(
                        alert::DECRYPT_ERROR,
                        "the server's Finished does not verify",
                    ));
                }
                transcript.update(msg);
                let th = transcript.current();
                let (client_ap, server_ap) = application_secrets(suite, &handshake_secret, &th);
                let fin = hs::message(ty::FINISHED, &hs::finished_mac(suite, &client_hs, &th));
                self.wr = Some(Keys::new(suite, client_hs));
                self.seal(ct::HANDSHAKE, &fin);
                self.wr = Some(Keys::new(suite, client_ap));
                self.rd = Some(Keys::new(suite, server_ap));
                self.state = State::Established;
                Ok(())
            }
            State::WaitServerFinished { .. } if t == ty::CERTIFICATE => Err(fail(
                alert::HANDSHAKE_FAILURE,
                "the server wants certificates (it did not accept the PSK)",
            )),
            State::WaitClientHello { mut lookup } if t == ty::CLIENT_HELLO => {
                self.accept_client_hello(msg, &mut lookup)
            }
            State::WaitClientFinished {
                suite,
                transcript,
                client_hs,
                client_ap,
            } if t == ty::FINISHED => {
                let want = hs::finished_mac(suite, &client_hs, &transcript.current());
                if !crate::crypto::same(&want, body) {
                    return Err(fail(
                        alert::DECRYPT_ERROR,
                        "the client's Finished does not verify",
                    ));
                }
                self.rd = Some(Keys::new(suite, client_ap));
                self.state = State::Established;
                Ok(())
            }
            State::Established if t == ty::NEW_SESSION_TICKET => {
                // Tickets resume sessions; each NVMe/TCP connection does a full PSK handshake instead.
                self.state = State::Established;
                Ok(())
            }
            State::Established if t == ty::KEY_UPDATE => {
                let ask = match body {
                    [0] => false,
                    [1] => true,
                    _ => return Err(fail(alert::ILLEGAL_PARAMETER, "KeyUpdate")),
                };
                self.state = State::Established;
                self.rd = self.rd.as_ref().map(Keys::updated);
                if ask {
                    self.update_write_keys();
                }
                Ok(())
            }
            _ => Err(fail(
                alert::UNEXPECTED_MESSAGE,
                format!("handshake message {t} out of order"),
            )),
        }
    }

    fn send_client_hello(&mut self) {
        let State::ClientStart { psk } = std::mem::replace(&mut self.state, State::Failed) else {
            return;
        };
        let secret = StaticSecret::from(random32());
        let share = PublicKey::from(&secret);
        let session_id = random32();
        let ch = hs::client_hello(
            psk.suite,
            &random32(),
            &session_id,
            share.as_bytes(),
            psk.identity.as_bytes(),
            &psk.key,
        );
        let mut transcript = psk.suite.transcript();
        transcript.update(&ch);
        self.suite = Some(psk.suite);
        self.seal(ct::HANDSHAKE, &ch);
        self.state = State::WaitServerHello {
            psk,
            secret,
            session_id,
            transcript,
        };
    }

    fn accept_client_hello(&mut self, msg: &[u8], lookup: &mut PskLookup) -> Result<(), Fail> {
        let ch = hs::parse_client_hello(msg)?;
        let mut chosen = None;
        for (i, (id, _)) in ch.psks.iter().enumerate() {
            if let Some(psk) = lookup(id) {
                chosen = Some((i, psk));
                break;
            }
        }
        let (i, psk) =
            chosen.ok_or_else(|| fail(alert::UNKNOWN_PSK_IDENTITY, "unknown PSK identity"))?;
        let s = psk.suite;
        if !ch.offers(s) {
            return Err(fail(
                alert::HANDSHAKE_FAILURE,
                format!("the client does not offer {}", s.name()),
            ));
        }
        if !hs::binder_ok(&ch, i, s, &psk.key) {
            return Err(fail(alert::DECRYPT_ERROR, "PSK binder does not verify"));
        }
        let secret = StaticSecret::from(random32());
        let shared = secret.diffie_hellman(&PublicKey::from(ch.share));
        if !shared.was_contributory() {
            return Err(fail(alert::ILLEGAL_PARAMETER, "degenerate x25519 share"));
        }
        let share = PublicKey::from(&secret);
        let sh = hs::server_hello(s, &random32(), ch.session_id, share.as_bytes(), i as u16);
        let compat = !ch.session_id.is_empty();
        self.identity = ch.psks[i].0.to_vec();
        let mut transcript = s.transcript();
        transcript.update(msg);
        transcript.update(&sh);
        let (hsec, client_hs, server_hs) =
            handshake_secrets(s, &psk.key, shared.as_bytes(), &transcript.current());
        self.suite = Some(s);
        self.seal(ct::HANDSHAKE, &sh);
        if compat {
            self.seal(ct::CHANGE_CIPHER_SPEC, &[1]);
        }
        self.wr = Some(Keys::new(s, server_hs.clone()));
        let ee = hs::message(ty::ENCRYPTED_EXTENSIONS, &[0, 0]);
        transcript.update(&ee);
        self.seal(ct::HANDSHAKE, &ee);
        let fin = hs::message(
            ty::FINISHED,
            &hs::finished_mac(s, &server_hs, &transcript.current()),
        );
        transcript.update(&fin);
        self.seal(ct::HANDSHAKE, &fin);
        let (client_ap, server_ap) = application_secrets(s, &hsec, &transcript.current());
        self.wr = Some(Keys::new(s, server_ap));
        self.rd = Some(Keys::new(s, client_hs.clone()));
        self.state = State::WaitClientFinished {
            suite: s,
            transcript,
            client_hs,
            client_ap,
        };
        Ok(())
    }
}

/// The handshake secret and both handshake traffic secrets (RFC 8446 section 7.1), from the PSK, the
/// x25519 result and the hash of ClientHello..ServerHello.
fn handshake_secrets(
    s: Suite,
    psk: &[u8],
    shared: &[u8],
    th: &[u8],
) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let early = hs::early_secret(s, psk);
    let derived = s.derive_secret(&early, "derived", &s.hash(&[]));
    let hsec = s.extract(&derived, shared);
    let c = s.derive_secret(&hsec, "c hs traffic", th);
    let v = s.derive_secret(&hsec, "s hs traffic", th);
    (hsec, c, v)
}

/// Both application traffic secrets from the handshake secret and the hash of ClientHello..server Finished.
fn application_secrets(s: Suite, hsec: &[u8], th: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let derived = s.derive_secret(hsec, "derived", &s.hash(&[]));
    let master = s.extract(&derived, &vec![0u8; s.hash_len()]);
    (
        s.derive_secret(&master, "c ap traffic", th),
        s.derive_secret(&master, "s ap traffic", th),
    )
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        TlsStream::read(self, buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        TlsStream::write(self, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        TlsStream::flush(self)
    }
}
