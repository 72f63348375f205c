//! Property tests of the superblock codec: arbitrary bytes never panic, valid superblocks round-trip, and each
//! single-field corruption the decoder checks for is rejected.
//!
//! Bounded: every property runs a fixed, small number of cases in `cargo test`; `PROPTEST_CASES=100000` runs
//! more by hand.
//!
//! The decoder checks the signature, the length field (against the header size, the buffer and
//! [`MAX_LENGTH`]), the CRC, the major version, that the entry table fits in the length, and every entry's slot
//! against `num_base_bdevs`. Matching the block size against the member's is done by examine (`examine_sb`),
//! not by the decoder, so it is not a decode error here.

use proptest::prelude::*;
use raid::sb::{
    crc32c, BaseState, DecodeError, SbBase, Superblock, BASE_LEN, HEADER_LEN, MAX_LENGTH,
    SIGNATURE, VERSION_MAJOR,
};
use uuid::Uuid;

/// Cases per property: `ci` unless `PROPTEST_CASES` says otherwise.
fn cases(ci: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci)
}

fn rd_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn wr_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes the CRC over the length the header states, so that a corruption elsewhere is what the decoder
/// has to catch.
fn refresh_crc(b: &mut [u8]) {
    let len = rd_u32(b, 12) as usize;
    b[16..20].fill(0);
    let crc = crc32c(&b[..len], 0);
    wr_u32(b, 16, crc);
}

/// The superblock as `read_superblock` hands it to the decoder: whole blocks covering [`MAX_LENGTH`], the bytes
/// after the superblock being whatever the disk holds.
fn as_read(b: &[u8], block_size: usize, fill: u8) -> Vec<u8> {
    let mut r = b.to_vec();
    r.resize(MAX_LENGTH.div_ceil(block_size) * block_size, fill);
    r
}

fn invalid_with(r: Result<Superblock, DecodeError>, what: &str) -> Result<(), TestCaseError> {
    match r {
        Err(DecodeError::Invalid(m)) => {
            prop_assert!(m.contains(what), "rejected for {m:?}, expected {what:?}");
        }
        other => prop_assert!(false, "expected Invalid({what}), got {other:?}"),
    }
    Ok(())
}

fn base_state() -> impl Strategy<Value = BaseState> {
    prop_oneof![
        Just(BaseState::Missing),
        Just(BaseState::Configured),
        Just(BaseState::Failed),
        Just(BaseState::Spare),
        // 0..=3 are the known states; they decode as those.
        (4u32..).prop_map(BaseState::Unknown),
    ]
}

fn entry(num_base_bdevs: u8) -> impl Strategy<Value = SbBase> {
    (
        any::<u128>(),
        any::<u64>(),
        any::<u64>(),
        base_state(),
        any::<u32>(),
        0..num_base_bdevs,
    )
        .prop_map(
            |(uuid, data_offset, data_size, state, flags, slot)| SbBase {
                uuid: Uuid::from_u128(uuid),
                data_offset,
                data_size,
                state,
                flags,
                slot,
            },
        )
}

/// Names as `encode` stores them unchanged: at most 63 bytes, no NUL.
fn name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z0-9_.-]{0,63}", "[^\\x00]{0,15}"]
}

/// Any superblock `encode` can write, with at least `min_entries` entries; now and then a full table of 255.
fn superblock(min_entries: usize) -> impl Strategy<Value = Superblock> {
    let header = (
        any::<u32>(),
        any::<u128>(),
        name(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
    );
    let table = (1u8..=255).prop_flat_map(move |num| {
        let entries = prop_oneof![
            9 => proptest::collection::vec(entry(num), min_entries..=8),
            1 => proptest::collection::vec(entry(num), 250..=255),
        ];
        (Just(num), entries)
    });
    (header, table).prop_map(
        |(
            (flags, uuid, name, raid_size, block_size, level, strip_size, state, seq_number),
            (num_base_bdevs, base_bdevs),
        )| Superblock {
            // `encode` always writes the current minor version.
            version_minor: 0,
            flags,
            uuid: Uuid::from_u128(uuid),
            name,
            raid_size,
            block_size,
            level,
            strip_size,
            state,
            seq_number,
            num_base_bdevs,
            base_bdevs,
        },
    )
}

/// What may be asserted about any decode, whatever the input.
fn check_any(buf: &[u8]) -> Result<(), TestCaseError> {
    match Superblock::decode(buf) {
        Ok(s) => {
            prop_assert!(buf.len() >= HEADER_LEN && &buf[..8] == SIGNATURE);
            let len = rd_u32(buf, 12) as usize;
            prop_assert!(s.length() <= len && len <= buf.len());
            prop_assert_eq!(s.base_bdevs.len(), buf[255] as usize);
            prop_assert!(s.base_bdevs.iter().all(|e| e.slot < s.num_base_bdevs));
        }
        Err(DecodeError::NeedMore(n)) => {
            prop_assert!(
                n > buf.len() && n <= MAX_LENGTH,
                "NeedMore({n}) for {}",
                buf.len()
            );
            // Given what it asked for, it does not ask again.
            let mut more = buf.to_vec();
            more.resize(n, 0);
            prop_assert!(!matches!(
                Superblock::decode(&more),
                Err(DecodeError::NeedMore(_))
            ));
        }
        Err(DecodeError::Invalid(m)) => prop_assert!(!m.is_empty()),
    }
    Ok(())
}

/// Inputs that get past the early checks often enough to reach the later ones: plain random bytes, a signature
/// followed by random bytes (length field included), and valid superblocks with a few bytes overwritten (the
/// CRC then recomputed or not).
fn noisy_input() -> impl Strategy<Value = Vec<u8>> {
    let mutations = proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4);
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        (
            proptest::collection::vec(any::<u8>(), 0..1200),
            prop_oneof![0u32..1200, any::<u32>()],
        )
            .prop_map(|(mut b, len)| {
                let mut v = SIGNATURE.to_vec();
                v.extend_from_slice(&1u16.to_le_bytes());
                v.extend_from_slice(&0u16.to_le_bytes());
                v.extend_from_slice(&len.to_le_bytes());
                b.splice(..v.len().min(b.len()), v);
                b
            }),
        (superblock(0), mutations, any::<bool>(), any::<bool>()).prop_map(
            |(s, muts, pad, fix_crc)| {
                let mut b = s.encode();
                if pad {
                    b = as_read(&b, 512, 0);
                }
                for (i, v) in muts {
                    let i = i.index(b.len());
                    b[i] = v;
                }
                let len = rd_u32(&b, 12) as usize;
                if fix_crc && (20..=b.len()).contains(&len) {
                    refresh_crc(&mut b);
                }
                b
            }
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(2000)))]

    /// Decoding never panics; it decodes, asks for more bytes (and only within the limit) or rejects.
    #[test]
    fn arbitrary_bytes_never_panic(buf in noisy_input()) {
        check_any(&buf)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(300)))]

    /// A written superblock reads back equal: exact, in whole blocks whatever follows it, and re-encoded to the
    /// same bytes. A cut-short read asks for the rest.
    #[test]
    fn valid_superblocks_round_trip(
        s in superblock(0),
        block_size in prop_oneof![Just(512usize), Just(4096)],
        fill in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let b = s.encode();
        prop_assert_eq!(b.len(), s.length());
        prop_assert_eq!(Superblock::decode(&b), Ok(s.clone()));
        prop_assert_eq!(Superblock::decode(&as_read(&b, block_size, fill)), Ok(s.clone()));
        prop_assert_eq!(Superblock::decode(&b).unwrap().encode(), b.clone());
        let cut = cut.index(b.len());
        if cut < HEADER_LEN {
            invalid_with(Superblock::decode(&b[..cut]), "signature")?;
        } else {
            prop_assert_eq!(Superblock::decode(&b[..cut]), Err(DecodeError::NeedMore(b.len())));
        }
    }

    /// Any one byte changed inside the CRC-covered range (the length field aside, which moves the range) is
    /// rejected: a CRC catches every error burst shorter than 33 bits.
    #[test]
    fn changed_byte_is_rejected(
        s in superblock(0),
        at in any::<prop::sample::Index>(),
        xor in 1u8..,
    ) {
        let mut b = as_read(&s.encode(), 512, 0);
        let len = s.length();
        let mut i = at.index(len - 4);
        if i >= 12 {
            i += 4;
        }
        b[i] ^= xor;
        let r = Superblock::decode(&b);
        prop_assert!(matches!(r, Err(DecodeError::Invalid(_))), "byte {} ^ {:#x}: {:?}", i, xor, r);
    }

    /// A wrong signature is rejected even with a matching CRC.
    #[test]
    fn bad_signature_is_rejected(s in superblock(0), at in 0usize..8, xor in 1u8..) {
        let mut b = as_read(&s.encode(), 512, 0);
        b[at] ^= xor;
        refresh_crc(&mut b);
        invalid_with(Superblock::decode(&b), "signature")?;
    }

    /// A wrong stored CRC is rejected.
    #[test]
    fn bad_crc_is_rejected(s in superblock(0), xor in 1u32..) {
        let mut b = as_read(&s.encode(), 512, 0);
        let crc = rd_u32(&b, 16);
        wr_u32(&mut b, 16, crc ^ xor);
        invalid_with(Superblock::decode(&b), "crc")?;
    }

    /// Another major version is rejected; a higher minor version is read (its additions are compatible).
    #[test]
    fn versions(s in superblock(0), major in any::<u16>(), minor in any::<u16>()) {
        prop_assume!(major != VERSION_MAJOR);
        let mut b = as_read(&s.encode(), 512, 0);
        b[8..10].copy_from_slice(&major.to_le_bytes());
        refresh_crc(&mut b);
        invalid_with(Superblock::decode(&b), "major version")?;

        let mut b = as_read(&s.encode(), 512, 0);
        b[10..12].copy_from_slice(&minor.to_le_bytes());
        refresh_crc(&mut b);
        let mut want = s.clone();
        want.version_minor = minor;
        prop_assert_eq!(Superblock::decode(&b), Ok(want));
    }

    /// A length shorter than the header is rejected; one past the buffer asks for more up to the largest
    /// possible superblock, and is rejected beyond it.
    #[test]
    fn length_out_of_range(
        s in superblock(0),
        short in 0u32..HEADER_LEN as u32,
        past in any::<prop::sample::Index>(),
        huge in (MAX_LENGTH as u32 + 1)..,
    ) {
        let b = s.encode();

        let mut c = b.clone();
        wr_u32(&mut c, 12, short);
        invalid_with(Superblock::decode(&c), "length")?;

        if b.len() < MAX_LENGTH {
            let want = b.len() + 1 + past.index(MAX_LENGTH - b.len());
            let mut c = b.clone();
            wr_u32(&mut c, 12, want as u32);
            prop_assert_eq!(Superblock::decode(&c), Err(DecodeError::NeedMore(want)));
        }

        for mut c in [b.clone(), as_read(&b, 512, 0)] {
            let huge = huge.max(c.len() as u32 + 1);
            wr_u32(&mut c, 12, huge);
            invalid_with(Superblock::decode(&c), "length")?;
        }
    }

    /// An entry table that does not fit in the stated length is rejected, whether the count grew or the length
    /// shrank (the CRC matching either way).
    #[test]
    fn entry_table_past_the_length(
        s in superblock(1),
        extra in any::<prop::sample::Index>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let n = s.base_bdevs.len();
        let b = as_read(&s.encode(), 512, 0);
        if n < 255 {
            let mut c = b.clone();
            c[255] = (n + 1 + extra.index(255 - n)) as u8;
            refresh_crc(&mut c);
            invalid_with(Superblock::decode(&c), "too small")?;
        }
        let mut c = b;
        let len = HEADER_LEN + cut.index(n * BASE_LEN);
        wr_u32(&mut c, 12, len as u32);
        refresh_crc(&mut c);
        invalid_with(Superblock::decode(&c), "too small")?;
    }

    /// An entry whose slot is not below `num_base_bdevs` is rejected: a slot raised past it, or the count
    /// lowered to a slot in use.
    #[test]
    fn slot_out_of_range(
        s in superblock(1),
        which in any::<prop::sample::Index>(),
        pick in any::<prop::sample::Index>(),
    ) {
        let n = s.base_bdevs.len();
        let num = s.num_base_bdevs as usize;
        let b = as_read(&s.encode(), 512, 0);
        let i = which.index(n);
        if num < 255 {
            let mut c = b.clone();
            c[HEADER_LEN + i * BASE_LEN + 40] = (num + pick.index(256 - num)) as u8;
            refresh_crc(&mut c);
            invalid_with(Superblock::decode(&c), "slot number")?;
        }
        let mut c = b;
        c[136] = pick.index(s.base_bdevs[i].slot as usize + 1) as u8;
        refresh_crc(&mut c);
        invalid_with(Superblock::decode(&c), "slot number")?;
    }
}
