//! TLS connections between our two roles, and against OpenSSL's own client and server (`openssl s_client` /
//! `s_server`, the library SPDK's `ssl` sock is built on), over loopback.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nvme_tls::{Suite, TlsPsk, TlsStream};

fn psk(identity: &str, key: &[u8], suite: Suite) -> TlsPsk {
    TlsPsk {
        identity: identity.into(),
        key: key.to_vec(),
        suite,
    }
}

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    for x in [&c, &s] {
        x.set_nonblocking(true).unwrap();
    }
    (c, s)
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

/// Drives both ends' handshakes until both are done or one fails.
fn handshake_both(a: &mut TlsStream, b: &mut TlsStream) -> Result<(), String> {
    let until = deadline();
    loop {
        let x = a.handshake().map_err(|e| format!("client: {e}"))?;
        let y = b.handshake().map_err(|e| format!("server: {e}"))?;
        if x && y {
            return Ok(());
        }
        assert!(Instant::now() < until, "handshake hangs");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sends `data` from `a` to `b` while reading it at `b`, as the queue pairs do (write, flush, read).
fn transfer(a: &mut TlsStream, b: &mut TlsStream, data: &[u8]) -> Vec<u8> {
    let (mut sent, mut got) = (0, Vec::new());
    let mut buf = vec![0u8; 100_000];
    let until = deadline();
    while got.len() < data.len() {
        if sent < data.len() {
            match a.write(&data[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("write: {e}"),
            }
        }
        a.flush().unwrap();
        match b.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("read: {e}"),
        }
        assert!(Instant::now() < until, "transfer hangs");
    }
    got
}

#[test]
fn our_client_and_server_agree_on_both_suites() {
    for (suite, n) in [(Suite::Aes128GcmSha256, 32), (Suite::Aes256GcmSha384, 48)] {
        let key = vec![0x42; n];
        let (c, s) = pair();
        let mut client = TlsStream::client(c, psk("NVMe0R01 h s", &key, suite));
        let k2 = key.clone();
        let mut server = TlsStream::server(
            s,
            Box::new(move |id| (id == b"NVMe0R01 h s").then(|| psk("NVMe0R01 h s", &k2, suite))),
        );
        handshake_both(&mut client, &mut server).unwrap();
        assert_eq!(server.identity(), b"NVMe0R01 h s");
        assert_eq!(server.suite(), Some(suite));
        // Larger than the send buffer's high mark, in odd pieces, both ways.
        let data: Vec<u8> = (0..3_000_001u32).map(|i| (i * 7 + i / 251) as u8).collect();
        assert!(transfer(&mut client, &mut server, &data) == data);
        assert!(transfer(&mut server, &mut client, &data[..12_345]) == data[..12_345]);
        client.close();
        let until = deadline();
        let mut b = [0u8; 16];
        loop {
            match server.read(&mut b) {
                Ok(0) => break,
                Ok(_) => panic!("data after close"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            assert!(Instant::now() < until);
        }
    }
}

#[test]
fn wrong_keys_and_unknown_identities_are_refused_with_alerts() {
    let suite = Suite::Aes128GcmSha256;
    // A different key: the binder does not verify (decrypt_error, 51).
    let (c, s) = pair();
    let mut client = TlsStream::client(c, psk("id", &[1; 32], suite));
    let mut server = TlsStream::server(s, Box::new(move |_| Some(psk("id", &[2; 32], suite))));
    let e = handshake_both(&mut client, &mut server).unwrap_err();
    assert!(e.contains("binder"), "{e}");
    let until = deadline();
    let e = loop {
        match client.handshake() {
            Err(e) => break e.to_string(),
            Ok(_) => assert!(Instant::now() < until),
        }
    };
    assert!(e.contains("alert 51"), "{e}");
    // An identity the server does not know (unknown_psk_identity, 115).
    let (c, s) = pair();
    let mut client = TlsStream::client(c, psk("who", &[1; 32], suite));
    let mut server = TlsStream::server(s, Box::new(|_| None));
    let e = handshake_both(&mut client, &mut server).unwrap_err();
    assert!(e.contains("unknown PSK identity"), "{e}");
    // The server's key is for the other suite, which the client did not offer.
    let (c, s) = pair();
    let mut client = TlsStream::client(c, psk("id", &[1; 32], suite));
    let mut server = TlsStream::server(
        s,
        Box::new(|_| Some(psk("id", &[1; 48], Suite::Aes256GcmSha384))),
    );
    assert!(handshake_both(&mut client, &mut server).is_err());
}

#[test]
fn garbage_and_tampered_records_fail_the_connection_cleanly() {
    // A server fed junk instead of a ClientHello.
    let (mut c, s) = pair();
    let mut server = TlsStream::server(s, Box::new(|_| None));
    c.write_all(&[22, 3, 1, 0, 4, 1, 0, 0, 9]).unwrap();
    c.write_all(&[0xff; 64]).unwrap();
    let until = deadline();
    while server.handshake().is_ok() {
        assert!(Instant::now() < until);
    }
    // A record longer than TLS allows.
    let (mut c, s) = pair();
    let mut server = TlsStream::server(s, Box::new(|_| None));
    c.write_all(&[22, 3, 3, 0xff, 0xff]).unwrap();
    while server.handshake().is_ok() {
        assert!(Instant::now() < until);
    }
    // A flipped bit in an established connection's record: bad_record_mac, then nothing more is read. The
    // bytes travel through a relay between two socket pairs, which flips one on request.
    let suite = Suite::Aes128GcmSha256;
    let (c, mut mid_c) = pair();
    let (mut mid_s, s) = pair();
    let mut client = TlsStream::client(c, psk("id", &[1; 32], suite));
    let mut server = TlsStream::server(s, Box::new(move |_| Some(psk("id", &[1; 32], suite))));
    let mut relay = |flip: bool, client: &mut TlsStream, server: &mut TlsStream| {
        let mut b = [0u8; 65536];
        if let Ok(n) = mid_c.read(&mut b) {
            if flip && n > 10 {
                b[n - 3] ^= 1;
            }
            mid_s.write_all(&b[..n]).unwrap();
        }
        if let Ok(n) = mid_s.read(&mut b) {
            mid_c.write_all(&b[..n]).unwrap();
        }
        let _ = (client.handshake(), server.handshake());
    };
    while !(client.established() && server.established()) {
        relay(false, &mut client, &mut server);
        assert!(Instant::now() < until);
    }
    client.write(b"hello, tampered").unwrap();
    client.flush().unwrap();
    let mut b = [0u8; 64];
    let e = loop {
        relay(true, &mut client, &mut server);
        match server.read(&mut b) {
            Ok(_) => panic!("a tampered record was accepted"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => break e.to_string(),
        }
        assert!(Instant::now() < until);
    };
    assert!(e.contains("authentication"), "{e}");
    assert!(server.read(&mut b).is_err());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn our_client_talks_to_openssl_s_server() {
    let key: Vec<u8> = (0..32u8).map(|i| i * 3 + 1).collect();
    let port = free_port();
    let mut srv = Command::new("openssl")
        .args([
            "s_server", "-tls1_3", "-nocert", "-naccept", "1", "-rev", "-quiet",
        ])
        .args(["-psk", &hex(&key), "-psk_identity", "NVMe0R01 host sub"])
        .args(["-ciphersuites", "TLS_AES_128_GCM_SHA256"])
        .args(["-accept", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl");
    let until = deadline();
    let sock = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) => {
                assert!(Instant::now() < until, "s_server did not listen");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    sock.set_nonblocking(true).unwrap();
    let mut c = TlsStream::client(sock, psk("NVMe0R01 host sub", &key, Suite::Aes128GcmSha256));
    while !c.handshake().unwrap() {
        assert!(Instant::now() < until, "handshake with s_server hangs");
        std::thread::sleep(Duration::from_millis(1));
    }
    c.write(b"nvme over tls\n").unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    while !got.ends_with(b"\n") {
        c.flush().unwrap();
        match c.read(&mut b) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < until, "no echo");
    }
    assert_eq!(got, b"slt revo emvn\n");
    c.close();
    let _ = srv.kill();
    let _ = srv.wait();
}

#[test]
fn openssl_s_client_talks_to_our_server() {
    let key: Vec<u8> = (0..32u8).map(|i| 255 - i).collect();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut cli = Command::new("openssl")
        .args(["s_client", "-tls1_3", "-quiet", "-ign_eof"])
        .args(["-psk", &hex(&key), "-psk_identity", "NVMe0R01 h2 s2"])
        .args(["-ciphersuites", "TLS_AES_128_GCM_SHA256"])
        .args(["-connect", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl");
    let (sock, _) = l.accept().unwrap();
    sock.set_nonblocking(true).unwrap();
    let k = key.clone();
    let mut s = TlsStream::server(
        sock,
        Box::new(move |id| (id == b"NVMe0R01 h2 s2").then(|| psk("x", &k, Suite::Aes128GcmSha256))),
    );
    let until = deadline();
    while !s.handshake().unwrap() {
        assert!(Instant::now() < until, "handshake with s_client hangs");
        std::thread::sleep(Duration::from_millis(1));
    }
    cli.stdin.as_mut().unwrap().write_all(b"ping\n").unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    while !got.ends_with(b"\n") {
        match s.read(&mut b) {
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < until, "nothing from s_client");
    }
    assert_eq!(got, b"ping\n");
    s.write(b"pong\n").unwrap();
    while s.pending() {
        s.flush().unwrap();
    }
    s.close();
    drop(cli.stdin.take());
    let out = cli.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pong"), "s_client printed {text:?}");
}
