//! NVMe Qualified Names as SPDK checks them (`nvmf_nqn_is_valid()`, lib/nvmf/subsystem.c), for subsystem,
//! host and referral NQNs.

/// The well-known discovery subsystem NQN.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Shortest NQN (the `nqn.yyyy-mm.` prefix).
pub const NQN_MIN_LEN: usize = 11;
/// Longest NQN, in bytes.
pub const NQN_MAX_LEN: usize = 223;
/// Prefix of the UUID form, `nqn.2014-08.org.nvmexpress:uuid:` followed by a UUID.
pub const NQN_UUID_PREFIX: &str = "nqn.2014-08.org.nvmexpress:uuid:";
/// Longest label of the reverse domain (RFC 1034).
pub const DOMAIN_LABEL_MAX_LEN: usize = 63;

/// `nvmf_nqn_is_valid()`: the reason is logged as SPDK does.
pub fn nqn_is_valid(nqn: &str) -> bool {
    match check_nqn(nqn) {
        Ok(()) => true,
        Err(why) => {
            log::error!("{why}");
            false
        }
    }
}

/// Where SPDK's domain-label state machine stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Label {
    /// A label must start with a letter.
    Start,
    /// After a `-`: a letter, digit or `-`.
    Hyphen,
    /// A letter, digit, `-` or `.`.
    Any,
}

/// `nvmf_nqn_is_valid()` with SPDK's log line for a refusal. Lengths count bytes. Accepted: the discovery NQN;
/// `nqn.2014-08.org.nvmexpress:uuid:` and a UUID (36 characters, hex either case); `nqn.yyyy-mm.` (digits),
/// a reverse domain (labels of letters, digits and inner `-`, each starting with a letter; SPDK checks a label's
/// length only when another character follows it, so the last label may have 64 characters and the domain may
/// be empty or end with `.`), then `:` and at least one more character (anything, `:` included).
pub fn check_nqn(nqn: &str) -> Result<(), String> {
    let b = nqn.as_bytes();
    let len = b.len();
    if len > NQN_MAX_LEN {
        return Err(format!(
            "Invalid NQN \"{nqn}\": length {len} > max {NQN_MAX_LEN}"
        ));
    }
    if len < NQN_MIN_LEN {
        return Err(format!(
            "Invalid NQN \"{nqn}\": length {len} < min {NQN_MIN_LEN}"
        ));
    }
    if nqn == DISCOVERY_NQN {
        return Ok(());
    }
    if let Some(uuid) = nqn.strip_prefix(NQN_UUID_PREFIX) {
        if uuid.len() != 36 {
            return Err(format!(
                "Invalid NQN \"{nqn}\": uuid is not the correct length"
            ));
        }
        if parse_uuid(uuid).is_none() {
            return Err(format!(
                "Invalid NQN \"{nqn}\": uuid is not formatted correctly"
            ));
        }
        return Ok(());
    }
    if !nqn.starts_with("nqn.") {
        return Err(format!(
            "Invalid NQN \"{nqn}\": NQN must begin with \"nqn.\"."
        ));
    }
    let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    let is = |i: usize, c: u8| b.get(i) == Some(&c);
    if !((4..8).all(digit) && is(8, b'-') && digit(9) && digit(10) && is(11, b'.')) {
        return Err(format!("Invalid date code in NQN \"{nqn}\""));
    }
    let end = match nqn.find(':') {
        Some(i) if i < len - 1 => i,
        _ => {
            return Err(format!(
            "Invalid NQN \"{nqn}\". NQN must contain user specified name with a ':' as a prefix."
        ))
        }
    };
    let bad = |what: &str| format!("Invalid domain name in NQN \"{nqn}\". {what}");
    let mut state = Label::Start;
    let mut label_len = 0;
    for (i, &c) in b.iter().enumerate().take(end).skip(12) {
        // As SPDK: the length is checked before each character, so a label's last character goes unchecked.
        if label_len > DOMAIN_LABEL_MAX_LEN {
            return Err(bad("At least one Label is too long."));
        }
        let alnum = c.is_ascii_alphanumeric();
        match (state, c) {
            (Label::Start, _) if c.is_ascii_alphabetic() => state = Label::Any,
            (Label::Start, _) => return Err(bad("Label names must start with a letter.")),
            (_, _) if alnum => state = Label::Any,
            (_, b'-') if i == end - 1 => {
                return Err(bad("Label names must end with an alphanumeric symbol."))
            }
            (_, b'-') => state = Label::Hyphen,
            (Label::Hyphen, b'.') => {
                return Err(bad("Label names must end with an alphanumeric symbol."))
            }
            (Label::Any, b'.') => {
                state = Label::Start;
                label_len = 0;
                continue;
            }
            _ => return Err(bad("Label names must contain only [a-z,A-Z,0-9,'-','.'].")),
        }
        label_len += 1;
    }
    // The user-specified part must be valid UTF-8, which a Rust string is.
    Ok(())
}

/// `spdk_uuid_parse()` (libuuid's `uuid_parse()`): exactly `8-4-4-4-12` hex digits, either case. Stricter
/// than [`uuid::Uuid::parse_str`], which also takes the simple, braced and URN forms.
pub fn parse_uuid(s: &str) -> Option<uuid::Uuid> {
    let b = s.as_bytes();
    let shaped = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
    if shaped {
        uuid::Uuid::parse_str(s).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert!(nqn_is_valid(DISCOVERY_NQN));
        assert!(nqn_is_valid("nqn.2016-06.io.spdk:cnode1"));
        assert!(nqn_is_valid(
            "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
        ));
        assert!(!nqn_is_valid(
            "nqn.2014-08.org.nvmexpress:uuid:{1111111-2222-3333-4444-555555555555}"
        ));
        assert!(!nqn_is_valid("nqn.2016-06"));
        assert_eq!(
            check_nqn("nqn.2016-06.io.spdk").unwrap_err(),
            "Invalid NQN \"nqn.2016-06.io.spdk\". NQN must contain user specified name with a ':' as a prefix."
        );
        assert_eq!(
            check_nqn("nqn.2016-06.1o:x").unwrap_err(),
            "Invalid domain name in NQN \"nqn.2016-06.1o:x\". Label names must start with a letter."
        );
        // Byte lengths.
        let long = format!("nqn.2016-06.io.spdk:{}", "é".repeat(102));
        assert_eq!(long.len(), 224);
        assert!(!nqn_is_valid(&long));
    }

    #[test]
    fn uuids() {
        assert!(parse_uuid("ABCDEF01-2222-3333-4444-555555555555").is_some());
        assert!(parse_uuid("abcdef0122223333-4444-555555555555--").is_none());
        assert!(parse_uuid("abcdef0122223333444455555555555").is_none());
    }
}
