//! Group SIDs from the logon-info buffer of a Microsoft PAC.
//!
//! An Active Directory KDC puts a PAC (Privilege Attribute Certificate, [MS-PAC]) into
//! every ticket. MIT krb5's acceptor hands its logon-info buffer (PAC buffer type 1) to
//! us through `gss_get_name_attribute(name, "urn:mspac:logon-info")`; [`group_sids`]
//! turns that buffer into the Windows group SIDs the user belongs to.
//!
//! # Format
//!
//! The buffer is a `KERB_VALIDATION_INFO` ([MS-PAC] 2.5) serialised with NDR type
//! serialisation version 1 ([MS-RPCE] 2.2.6), all little-endian:
//!
//! | bytes | content |
//! |---|---|
//! | 8 | common type header: version `01`, data representation `10` (little-endian), header length `08 00`, filler |
//! | 8 | private header: object buffer length (the bytes that follow the 16 header bytes), filler |
//! | 4 | referent ID of the top-level unique pointer to the structure (never 0) |
//! | 216 | the structure's fixed part, in field order |
//! | rest | the pointers' referents ("deferred" data), in the order of the pointers |
//!
//! Every member of the fixed part is 4-aligned: a `FILETIME` is two `DWORD`s, not an
//! NDR hyper, and the example in [MS-PAC] 3.1 has `LogonTime` right after the 20 bytes
//! of headers and pointer. Each `RPC_UNICODE_STRING` is `Length`, `MaximumLength` (both
//! in bytes) and a pointer; its characters follow later as a conformant varying array
//! (max count, offset, actual count, then UTF-16 units). `GroupIds` and
//! `ResourceGroupIds` are conformant arrays of `{RelativeId, Attributes}`. `ExtraSids` is
//! a conformant array of `{Sid pointer, Attributes}` whose SIDs follow the array. An
//! `RPC_SID` ([MS-DTYP] 2.4.2.3) is a conformant structure: its max count (which must equal
//! `SubAuthorityCount`) comes first, then `Revision`, `SubAuthorityCount`, the 6-byte
//! big-endian `IdentifierAuthority` and the sub-authorities. Every deferred item starts
//! 4-aligned. A null pointer (referent ID 0) has no deferred data. The deferred order is:
//! the six strings `EffectiveName` to `HomeDirectoryDrive`, `GroupIds`, `LogonServer`,
//! `LogonDomainName`, `LogonDomainId`, `ExtraSids` (array, then each non-null SID),
//! `ResourceGroupDomainSid`, `ResourceGroupIds`.
//!
//! The buffer is treated as hostile: every read is bounds-checked, every count is checked
//! against the bytes left before anything is allocated for it, conformant max counts must
//! agree with the counts they repeat, and any inconsistency is an error naming the field.
//!
//! # Which SIDs
//!
//! In first-seen order, without duplicates:
//!
//! 1. each `GroupIds` RID appended to `LogonDomainId` (the account domain's global groups),
//! 2. `PrimaryGroupId` appended to `LogonDomainId` (normally already among them),
//! 3. each `ExtraSids` SID (universal groups and groups of other domains, SID history,
//!    well-known SIDs such as S-1-18-1),
//! 4. each `ResourceGroupIds` RID appended to `ResourceGroupDomainSid`, when that is
//!    present (domain-local groups of the resource domain).
//!
//! The user's own SID is left out: `LogonDomainId` plus `UserId` or, when `UserId` is 0,
//! the first `ExtraSids` entry, which [MS-PAC] 2.5 says is then the account's SID. No SID
//! filtering ([MS-PAC] 4.1.2.2) is done here.
//!
//! # Trust
//!
//! Parsing proves nothing about where the bytes came from. Only a PAC whose signatures
//! were verified may be used: MIT marks a name attribute `authenticated` only after the
//! PAC's server signature verified with the service key, whereas an unauthenticated
//! attribute can come from authorization data the client wrote itself. The caller checks
//! that flag; this module only decodes.
//!
//! [MS-PAC]: https://learn.microsoft.com/openspecs/windows_protocols/ms-pac/
//! [MS-RPCE]: https://learn.microsoft.com/openspecs/windows_protocols/ms-rpce/
//! [MS-DTYP]: https://learn.microsoft.com/openspecs/windows_protocols/ms-dtyp/

use std::collections::HashSet;
use std::fmt;

/// Prefix of every error message.
const CONTEXT: &str = "PAC logon info";

/// Common header + private header of NDR type serialisation version 1.
const HEADER_LEN: usize = 16;

/// [MS-DTYP] 2.4.2.2: at most 15 sub-authorities.
const MAX_SUB_AUTHORITIES: u8 = 15;

/// The group SIDs a PAC logon-info buffer grants, as strings "S-1-5-21-...".
pub(crate) fn group_sids(logon_info: &[u8]) -> Result<Vec<String>, String> {
    let info = parse(logon_info)?;
    Ok(info.group_sids())
}

/// The parts of `KERB_VALIDATION_INFO` that name groups.
#[derive(Debug)]
struct ValidationInfo {
    user_id: u32,
    primary_group_id: u32,
    logon_domain_id: Sid,
    group_rids: Vec<u32>,
    extra_sids: Vec<Sid>,
    resource_group_domain_sid: Option<Sid>,
    resource_group_rids: Vec<u32>,
}

impl ValidationInfo {
    fn group_sids(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        // The account's own SID is never reported, wherever it appears.
        let user_sid = if self.user_id != 0 {
            Some(self.logon_domain_id.with_rid(self.user_id))
        } else {
            self.extra_sids.first().cloned()
        };
        if let Some(user) = user_sid {
            seen.insert(user.to_string());
        }
        let mut out = Vec::new();
        let mut add = |sid: &Sid| {
            let text = sid.to_string();
            if seen.insert(text.clone()) {
                out.push(text);
            }
        };
        for &rid in &self.group_rids {
            add(&self.logon_domain_id.with_rid(rid));
        }
        add(&self.logon_domain_id.with_rid(self.primary_group_id));
        for sid in &self.extra_sids {
            add(sid);
        }
        if let Some(domain) = &self.resource_group_domain_sid {
            for &rid in &self.resource_group_rids {
                add(&domain.with_rid(rid));
            }
        }
        out
    }
}

/// A SID: revision 1, a 48-bit identifier authority and up to 15 sub-authorities.
#[derive(Debug, Clone)]
struct Sid {
    identifier_authority: u64,
    sub_authorities: Vec<u32>,
}

impl Sid {
    fn with_rid(&self, rid: u32) -> Sid {
        let mut sub_authorities = Vec::with_capacity(self.sub_authorities.len().saturating_add(1));
        sub_authorities.extend_from_slice(&self.sub_authorities);
        sub_authorities.push(rid);
        Sid {
            identifier_authority: self.identifier_authority,
            sub_authorities,
        }
    }
}

impl fmt::Display for Sid {
    /// [MS-DTYP] 2.4.2.1: the authority in decimal below 2^32, else as 12 hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.identifier_authority < 1 << 32 {
            write!(f, "S-1-{}", self.identifier_authority)?;
        } else {
            write!(f, "S-1-0x{:012X}", self.identifier_authority)?;
        }
        for sub in &self.sub_authorities {
            write!(f, "-{sub}")?;
        }
        Ok(())
    }
}

/// The inline part of an `RPC_UNICODE_STRING`.
#[derive(Debug, Clone, Copy)]
struct UnicodeString {
    name: &'static str,
    length: u16,
    maximum_length: u16,
    referent: u32,
}

/// A bounds-checked little-endian cursor. Alignment is relative to the start of the
/// logon-info buffer, which is 8-aligned in the PAC and whose 16 header bytes keep
/// every NDR alignment the same.
#[derive(Debug)]
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let bytes = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or_else(|| {
                format!(
                    "{CONTEXT}: {what} runs off the end of the buffer (needs {n} bytes at offset {}, {} left)",
                    self.pos,
                    self.remaining()
                )
            })?;
        self.pos = self.pos.saturating_add(n);
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let bytes = self.take(N, what)?;
        <[u8; N]>::try_from(bytes).map_err(|_| format!("{CONTEXT}: {what}: internal length error"))
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        self.array::<1>(what).map(|[b]| b)
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn skip(&mut self, n: usize, what: &str) -> Result<(), String> {
        self.take(n, what).map(drop)
    }

    /// Skips the padding up to the next multiple of 4 (all this structure needs).
    fn align4(&mut self, what: &str) -> Result<(), String> {
        let pad = (4 - self.pos % 4) % 4;
        self.take(pad, what).map(drop)
    }

    /// Checks that `count` elements of `size` bytes fit in what is left, and returns
    /// `count` as a `usize` safe to allocate for.
    fn fitting(&self, count: u32, size: usize, what: &str) -> Result<usize, String> {
        usize::try_from(count)
            .ok()
            .filter(|n| {
                n.checked_mul(size)
                    .is_some_and(|bytes| bytes <= self.remaining())
            })
            .ok_or_else(|| {
                format!(
                    "{CONTEXT}: {what} count {count} exceeds the buffer ({} bytes left)",
                    self.remaining()
                )
            })
    }

    fn unicode_string(&mut self, name: &'static str) -> Result<UnicodeString, String> {
        Ok(UnicodeString {
            name,
            length: self.u16(name)?,
            maximum_length: self.u16(name)?,
            referent: self.u32(name)?,
        })
    }

    /// Skips a string's deferred characters, checking them against its inline lengths.
    fn unicode_string_data(&mut self, s: UnicodeString) -> Result<(), String> {
        if s.referent == 0 {
            return Ok(());
        }
        let name = s.name;
        self.align4(name)?;
        let max_count = self.u32(name)?;
        let offset = self.u32(name)?;
        let actual_count = self.u32(name)?;
        if max_count != u32::from(s.maximum_length / 2) {
            return Err(format!(
                "{CONTEXT}: {name} max count {max_count} does not match its MaximumLength of {} bytes",
                s.maximum_length
            ));
        }
        if offset != 0 {
            return Err(format!(
                "{CONTEXT}: {name} has array offset {offset}, expected 0"
            ));
        }
        if actual_count != u32::from(s.length / 2) || actual_count > max_count {
            return Err(format!(
                "{CONTEXT}: {name} actual count {actual_count} does not match its Length of {} bytes (max count {max_count})",
                s.length
            ));
        }
        let chars = self.fitting(actual_count, 2, name)?;
        self.skip(chars.saturating_mul(2), name)
    }

    /// A conformant array of `GROUP_MEMBERSHIP`; returns the RIDs.
    fn group_memberships(
        &mut self,
        count: u32,
        name: &str,
        count_name: &str,
    ) -> Result<Vec<u32>, String> {
        self.align4(name)?;
        let max_count = self.u32(name)?;
        if max_count != count {
            return Err(format!(
                "{CONTEXT}: {name} array max count {max_count} does not match {count_name} {count}"
            ));
        }
        let n = self.fitting(max_count, 8, name)?;
        let mut rids = Vec::with_capacity(n);
        for _ in 0..n {
            rids.push(self.u32(name)?);
            self.u32(name)?; // Attributes
        }
        Ok(rids)
    }

    /// A deferred `RPC_SID` (conformant structure).
    fn sid(&mut self, what: &str) -> Result<Sid, String> {
        self.align4(what)?;
        let max_count = self.u32(what)?;
        let revision = self.u8(what)?;
        let count = self.u8(what)?;
        let authority: [u8; 6] = self.array(what)?;
        if revision != 1 {
            return Err(format!(
                "{CONTEXT}: {what} has revision {revision}, expected 1"
            ));
        }
        if count > MAX_SUB_AUTHORITIES {
            return Err(format!(
                "{CONTEXT}: {what} SubAuthorityCount {count} exceeds {MAX_SUB_AUTHORITIES}"
            ));
        }
        if max_count != u32::from(count) {
            return Err(format!(
                "{CONTEXT}: {what} max count {max_count} does not match its SubAuthorityCount {count}"
            ));
        }
        let identifier_authority = authority
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        let mut sub_authorities = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            sub_authorities.push(self.u32(what)?);
        }
        Ok(Sid {
            identifier_authority,
            sub_authorities,
        })
    }
}

/// Checks the serialisation headers and returns a reader positioned after them, limited
/// to the object buffer length they declare.
fn open(logon_info: &[u8]) -> Result<Reader<'_>, String> {
    let header = logon_info.get(..HEADER_LEN).ok_or_else(|| {
        format!(
            "{CONTEXT}: {} bytes is shorter than the {HEADER_LEN}-byte NDR serialisation header",
            logon_info.len()
        )
    })?;
    let mut r = Reader {
        buf: header,
        pos: 0,
    };
    let version = r.u8("header")?;
    let representation = r.u8("header")?;
    let common_len = r.u16("header")?;
    r.skip(4, "header")?; // filler, 0xcccccccc
    let object_len = r.u32("header")?;
    if version != 1 {
        return Err(format!(
            "{CONTEXT}: bad header: serialisation version {version}, expected 1"
        ));
    }
    if representation != 0x10 {
        return Err(format!(
            "{CONTEXT}: bad header: data representation {representation:#04x}, only little-endian (0x10) is supported"
        ));
    }
    if common_len != 8 {
        return Err(format!(
            "{CONTEXT}: bad header: common header length {common_len}, expected 8"
        ));
    }
    let body_len = logon_info.len().saturating_sub(HEADER_LEN);
    let end = usize::try_from(object_len)
        .ok()
        .filter(|&n| n <= body_len)
        .and_then(|n| n.checked_add(HEADER_LEN))
        .ok_or_else(|| {
            format!(
                "{CONTEXT}: bad header: object buffer length {object_len} exceeds the {body_len} bytes after the header"
            )
        })?;
    let buf = logon_info
        .get(..end)
        .ok_or_else(|| format!("{CONTEXT}: bad header: object buffer length {object_len}"))?;
    Ok(Reader {
        buf,
        pos: HEADER_LEN,
    })
}

fn parse(logon_info: &[u8]) -> Result<ValidationInfo, String> {
    let mut r = open(logon_info)?;
    if r.u32("top-level pointer")? == 0 {
        return Err(format!("{CONTEXT}: null KERB_VALIDATION_INFO pointer"));
    }

    // The fixed part, 216 bytes.
    r.skip(6 * 8, "LogonTime..PasswordMustChange")?;
    let mut strings = Vec::with_capacity(8);
    for name in [
        "EffectiveName",
        "FullName",
        "LogonScript",
        "ProfilePath",
        "HomeDirectory",
        "HomeDirectoryDrive",
    ] {
        strings.push(r.unicode_string(name)?);
    }
    r.skip(2 + 2, "LogonCount, BadPasswordCount")?;
    let user_id = r.u32("UserId")?;
    let primary_group_id = r.u32("PrimaryGroupId")?;
    let group_count = r.u32("GroupCount")?;
    let group_ids = r.u32("GroupIds")?;
    r.skip(4 + 16, "UserFlags, UserSessionKey")?;
    let logon_server = r.unicode_string("LogonServer")?;
    let logon_domain_name = r.unicode_string("LogonDomainName")?;
    let logon_domain_id = r.u32("LogonDomainId")?;
    r.skip(
        8 + 4 + 4 + 8 + 8 + 4 + 4,
        "Reserved1..Reserved3 (UserAccountControl, SubAuthStatus, interactive logon times and count)",
    )?;
    let sid_count = r.u32("SidCount")?;
    let extra_sids_ptr = r.u32("ExtraSids")?;
    let resource_domain_ptr = r.u32("ResourceGroupDomainSid")?;
    let resource_group_count = r.u32("ResourceGroupCount")?;
    let resource_group_ids = r.u32("ResourceGroupIds")?;

    // Deferred referents, in the order of their pointers.
    for s in strings {
        r.unicode_string_data(s)?;
    }
    let group_rids = if group_ids != 0 {
        r.group_memberships(group_count, "GroupIds", "GroupCount")?
    } else {
        Vec::new()
    };
    r.unicode_string_data(logon_server)?;
    r.unicode_string_data(logon_domain_name)?;
    if logon_domain_id == 0 {
        return Err(format!("{CONTEXT}: LogonDomainId is null"));
    }
    let logon_domain_id = r.sid("LogonDomainId")?;

    let mut extra_sids = Vec::new();
    if extra_sids_ptr != 0 {
        r.align4("ExtraSids")?;
        let max_count = r.u32("ExtraSids")?;
        if max_count != sid_count {
            return Err(format!(
                "{CONTEXT}: ExtraSids array max count {max_count} does not match SidCount {sid_count}"
            ));
        }
        let n = r.fitting(max_count, 8, "ExtraSids")?;
        let mut referents = Vec::with_capacity(n);
        for _ in 0..n {
            referents.push(r.u32("ExtraSids")?);
            r.u32("ExtraSids")?; // Attributes
        }
        extra_sids.reserve(n);
        for (i, referent) in referents.into_iter().enumerate() {
            if referent != 0 {
                extra_sids.push(r.sid(&format!("ExtraSids[{i}]"))?);
            }
        }
    }

    let resource_group_domain_sid = if resource_domain_ptr != 0 {
        Some(r.sid("ResourceGroupDomainSid")?)
    } else {
        None
    };
    let resource_group_rids = if resource_group_ids != 0 {
        r.group_memberships(
            resource_group_count,
            "ResourceGroupIds",
            "ResourceGroupCount",
        )?
    } else {
        Vec::new()
    };

    Ok(ValidationInfo {
        user_id,
        primary_group_id,
        logon_domain_id,
        group_rids,
        extra_sids,
        resource_group_domain_sid,
        resource_group_rids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---------------------------------------------------------------------------------
    // Helpers
    // ---------------------------------------------------------------------------------

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        assert!(s.len() % 2 == 0, "odd hex length");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The buffer of type `ul_type` in a whole PAC: PACTYPE is `cBuffers`, `Version`, then
    /// `cBuffers` PAC_INFO_BUFFERs of `{ulType u32, cbBufferSize u32, Offset u64}`
    /// ([MS-PAC] 2.3, 2.4), offsets counted from the start of the PACTYPE.
    fn pac_buffer(pac: &[u8], ul_type: u32) -> Option<&[u8]> {
        let le32 = |at: usize| {
            pac.get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        };
        let count = le32(0)?;
        assert_eq!(le32(4)?, 0, "PACTYPE version");
        for i in 0..count as usize {
            let entry = 8 + 16 * i;
            if le32(entry)? == ul_type {
                let size = le32(entry + 4)? as usize;
                let offset = pac.get(entry + 8..entry + 16)?;
                let offset =
                    usize::try_from(u64::from_le_bytes(offset.try_into().unwrap())).ok()?;
                return pac.get(offset..offset.checked_add(size)?);
            }
        }
        None
    }

    fn sids(domain: &str, rids: &[u32]) -> Vec<String> {
        rids.iter().map(|rid| format!("{domain}-{rid}")).collect()
    }

    fn find(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("pattern in test vector")
    }

    fn put32(buf: &mut [u8], at: usize, value: u32) {
        buf[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    fn err(buf: &[u8]) -> String {
        match group_sids(buf) {
            Ok(sids) => panic!("expected an error, got {sids:?}"),
            Err(e) => e,
        }
    }

    /// Every prefix of `buf` is an error (the header's object length no longer fits),
    /// and every prefix whose object length is patched to fit either fails or, when only
    /// trailing padding was cut, still gives `expected`. Nothing panics.
    fn check_truncations(buf: &[u8], expected: &[String]) {
        for len in 0..buf.len() {
            let prefix = &buf[..len];
            assert!(group_sids(prefix).is_err(), "prefix of {len} bytes parsed");
            if len >= HEADER_LEN {
                let mut patched = prefix.to_vec();
                put32(&mut patched, 8, (len - HEADER_LEN) as u32);
                if let Ok(got) = group_sids(&patched) {
                    assert_eq!(got, expected, "prefix of {len} bytes");
                }
            }
        }
    }

    // Offsets in a logon-info buffer: 16 header bytes, the 4-byte top-level referent,
    // then the fixed part.
    const FIXED: usize = HEADER_LEN + 4;
    const GROUP_COUNT_AT: usize = FIXED + 108;
    const SID_COUNT_AT: usize = FIXED + 196;

    // ---------------------------------------------------------------------------------
    // Real PACs
    // ---------------------------------------------------------------------------------

    /// [MS-PAC] section 3 "Structure Examples": the annotated PAC of user "lzhu" (UserId
    /// 2914711) in Microsoft's NTDEV domain, a Windows DC's output, from the AD-IF-RELEVANT
    /// wrapper on (1366 bytes:
    /// https://learn.microsoft.com/openspecs/windows_protocols/ms-pac/52466270-28c0-460b-9f9b-021e81f29847).
    /// Hex as transcribed in jcmturner/gokrb5 `test/testdata/test_vectors.go`
    /// (`MarshaledPAC_AuthorizationData_MS`, Apache-2.0). The PACTYPE starts after the
    /// 22-byte ASN.1 prefix; of its four buffers the logon info (type 1) is 0x4b0 bytes
    /// at PAC offset 0x48, identical to gokrb5's `MarshaledPAC_Kerb_Validation_Info_MS`.
    const MS_PAC_EXAMPLE: &str = "\
        308205523082054ea00402020080a182054404820540040000000000000001000000b00400004800\
        0000000000000a00000012000000f804000000000000060000001400000010050000000000000700\
        000014000000280500000000000001100800cccccccca00400000000000000000200d186660f656a\
        c601ffffffffffffff7fffffffffffffff7f17d439fe784ac6011794a328424bc601175424977a81\
        c60108000800040002002400240008000200120012000c0002000000000010000200000000001400\
        020000000000180002005410000097792c00010200001a0000001c00020020000000000000000000\
        0000000000000000000016001800200002000a000c00240002002800020000000000000000001000\
        0000000000000000000000000000000000000000000000000000000000000d0000002c0002000000\
        000000000000000000000400000000000000040000006c007a006800750012000000000000001200\
        00004c0069007100690061006e00670028004c006100720072007900290020005a00680075000900\
        000000000000090000006e0074006400730032002e00620061007400000000000000000000000000\
        00000000000000000000000000000000000000000000000000001a00000061c433000700000009c3\
        2d00070000005eb4320007000000010200000700000097b92c00070000002bf1320007000000ce30\
        330007000000a72e2e00070000002af132000700000098b92c000700000062c43300070000009401\
        33000700000076c4330007000000aefe2d000700000032d22c00070000001608320007000000425b\
        2e00070000005fb4320007000000ca9c35000700000085442d0007000000c2f0320007000000e9ea\
        310007000000ed8e2e0007000000b6eb310007000000ab2e2e0007000000720e2e00070000000c00\
        0000000000000b0000004e0054004400450056002d00440043002d00300035000000060000000000\
        0000050000004e0054004400450056000000040000000104000000000005150000005951b8176672\
        5d2564633b0b0d0000003000020007000000340002000700002038000200070000203c0002000700\
        00204000020007000020440002000700002048000200070000204c00020007000020500002000700\
        0020540002000700002058000200070000205c000200070000206000020007000020050000000105\
        00000000000515000000b9301b2eb7414c6c8c3b3515010200000500000001050000000000051500\
        00005951b81766725d2564633b0b74542f00050000000105000000000005150000005951b8176672\
        5d2564633b0be8383200050000000105000000000005150000005951b81766725d2564633b0bcd38\
        3200050000000105000000000005150000005951b81766725d2564633b0b5db43200050000000105\
        000000000005150000005951b81766725d2564633b0b411635000500000001050000000000051500\
        00005951b81766725d2564633b0be8ea3100050000000105000000000005150000005951b8176672\
        5d2564633b0bc1193200050000000105000000000005150000005951b81766725d2564633b0b29f1\
        3200050000000105000000000005150000005951b81766725d2564633b0b0f5f2e00050000000105\
        000000000005150000005951b81766725d2564633b0b2f5b2e000500000001050000000000051500\
        00005951b81766725d2564633b0bef8f3100050000000105000000000005150000005951b8176672\
        5d2564633b0b075f2e00000000000049d90e656ac60108006c007a006800750000000000000076ff\
        ffff41edce9a34815d3aef7bc98874805d250000000076fffffff7a534dab2c02986efe0fbe5110a\
        4f3200000000";

    /// The group SIDs of [`MS_PAC_EXAMPLE`]: the domain SID and the first group SID as
    /// spelled out in [MS-PAC] 3.1; the 26 `GroupIds` RIDs and the first 12 of the 13
    /// `ExtraSids` as asserted by gokrb5 `pac/kerb_validation_info_test.go`
    /// (`TestKerbValidationInfo_Unmarshal`); the 13th ExtraSid's RID (`07 5f 2e 00` at
    /// 0x509 of the [MS-PAC] dump, 3038983) read off the dump by hand.
    fn ms_pac_example_expected() -> Vec<String> {
        let ntdev = "S-1-5-21-397955417-626881126-188441444";
        let mut expected = sids(
            ntdev,
            &[
                3392609, 2999049, 3322974, 513, 2931095, 3338539, 3354830, 3026599, 3338538,
                2931096, 3392610, 3342740, 3392630, 3014318, 2937394, 3278870, 3038018, 3322975,
                3513546, 2966661, 3338434, 3271401, 3051245, 3271606, 3026603, 3018354,
            ],
        );
        // PrimaryGroupId 513 is already the fourth GroupIds entry.
        expected.push("S-1-5-21-773533881-1816936887-355810188-513".to_owned());
        expected.extend(sids(
            ntdev,
            &[
                3101812, 3291368, 3291341, 3322973, 3479105, 3271400, 3283393, 3338537, 3038991,
                3037999, 3248111, 3038983,
            ],
        ));
        expected
    }

    /// Logon info of "testuser1" (UserId 1106) of the USER.GOKRB5 domain (NetBIOS USER, DC
    /// "UDC"), for a service in the trusting RES.GOKRB5 domain, so it carries resource
    /// groups: jcmturner/gokrb5 `test/testdata/test_vectors.go`,
    /// `MarshaledPAC_Kerb_Validation_Info_Trust` (Apache-2.0). Both domains are Windows
    /// Server 2012 R2 Active Directory forests built by jcmturner/gokrb5-test
    /// `testenv/active-directory/{user,res}-gokrb5.ps1`.
    const TRUST_LOGON_INFO: &str = "\
        01100800cccccccc000200000000000000000200c30bcc79e444d301ffffffffffffff7fffffffff\
        ffffff7fc764125a0842d301c7247c84d142d301ffffffffffffff7f120012000400020016001600\
        08000200000000000c0002000000000010000200000000001400020000000000180002002e000000\
        5204000001020000030000001c000200200200000000000000000000000000000000000006000800\
        2000020008000a002400020028000200000000000000000010020000000000000000000000000000\
        00000000000000000000000000000000010000002c00020034000200020000003800020009000000\
        000000000900000074006500730074007500730065007200310000000b000000000000000b000000\
        54006500730074003100200055007300650072003100000000000000000000000000000000000000\
        00000000000000000000000000000000000000000000000000000000000000000300000056040000\
        07000000010200000700000055040000070000000400000000000000030000005500440043000000\
        05000000000000000400000055005300450052000400000001040000000000051500000020573088\
        34e7d1d0a2fb04440100000030000200070000000100000001010000000000120100000004000000\
        01040000000000051500000062dc8db6c8705249b5459e7502000000530400000700002054040000\
        0700002000000000";

    /// gokrb5 `pac/kerb_validation_info_test.go` (`TestKerbValidationInfo_Unmarshal_DomainTrust`)
    /// asserts exactly this list from its `GetGroupMembershipSIDs`.
    fn trust_expected() -> Vec<String> {
        [
            "S-1-5-21-2284869408-3503417140-1141177250-1110",
            "S-1-5-21-2284869408-3503417140-1141177250-513",
            "S-1-5-21-2284869408-3503417140-1141177250-1109",
            "S-1-18-1",
            "S-1-5-21-3062750306-1230139592-1973306805-1107",
            "S-1-5-21-3062750306-1230139592-1973306805-1108",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// A whole PAC (five buffers: logon info, client info, UPN/DNS info, two signatures)
    /// for "testuser1" (UserId 1105) of the TEST.GOKRB5 domain (NetBIOS TEST, DC "ADDC"):
    /// jcmturner/gokrb5 `test/testdata/test_vectors.go`, `MarshaledPAC_AD_WIN2K_PAC`
    /// (Apache-2.0); its logon info is that file's `MarshaledPAC_Kerb_Validation_Info`.
    /// The test data does not say which KDC implementation issued it.
    const GOKRB5_TEST_PAC: &str = "\
        0500000000000000010000002802000058000000000000000a0000001c0000008002000000000000\
        0c00000058000000a0020000000000000600000010000000f8020000000000000700000014000000\
        080300000000000001100800cccccccc180200000000000000000200058e4fdd80c6d201ffffffff\
        ffffff7fffffffffffffff7fcc27969c39c6d201cce7ffc602c7d201ffffffffffffff7f12001200\
        040002001600160008000200000000000c0002000000000010000200000000001400020000000000\
        18000200d80000005104000001020000050000001c00020020000000000000000000000000000000\
        0000000008000a002000020008000a00240002002800020000000000000000001002000000000000\
        000000000000000000000000000000000000000000000000020000002c0002000000000000000000\
        0000000009000000000000000900000074006500730074007500730065007200310000000b000000\
        000000000b0000005400650073007400310020005500730065007200310000000000000000000000\
        00000000000000000000000000000000000000000000000000000000000000000000000000000000\
        050000000102000007000000540400000700000055040000070000005b040000070000005c040000\
        07000000050000000000000004000000410044004400430005000000000000000400000054004500\
        53005400040000000104000000000005150000004c86cebca07160e63fdce8870200000030000200\
        070000203400020007000020050000000105000000000005150000004c86cebca07160e63fdce887\
        5a040000050000000105000000000005150000004c86cebca07160e63fdce8875704000000000000\
        808dd1dc80c6d2011200740065007300740075007300650072003100000000002a00100016004000\
        0000000000000000740065007300740075007300650072003100400074006500730074002e006700\
        6f006b0072006200350000000000000054004500530054002e0047004f004b005200420035000000\
        100000001e251d98d552be7df384f55076ffffff340be28b48765d0519ee9346cf53d82200000000";

    /// gokrb5 `pac/kerb_validation_info_test.go` (`TestKerbValidationInfo_Unmarshal`, second
    /// half) asserts GroupIds 513, 1108, 1109, 1115, 1116 and ExtraSids -1114, -1111.
    fn gokrb5_test_expected() -> Vec<String> {
        sids(
            "S-1-5-21-3167651404-3865080224-2280184895",
            &[513, 1108, 1109, 1115, 1116, 1114, 1111],
        )
    }

    fn ms_pac_logon_info() -> Vec<u8> {
        let authdata = unhex(MS_PAC_EXAMPLE);
        // AD-IF-RELEVANT { AD-WIN2K-PAC (128) OCTET STRING }, [MS-PAC] section 3.
        assert_eq!(
            authdata[..22],
            unhex("308205523082054ea00402020080a182054404820540")[..]
        );
        let info = pac_buffer(&authdata[22..], 1).expect("logon info buffer");
        assert_eq!(info.len(), 0x4b0);
        info.to_vec()
    }

    fn gokrb5_test_logon_info() -> Vec<u8> {
        let pac = unhex(GOKRB5_TEST_PAC);
        let info = pac_buffer(&pac, 1).expect("logon info buffer");
        assert_eq!(info.len(), 552);
        info.to_vec()
    }

    #[test]
    fn ms_pac_example() {
        let info = ms_pac_logon_info();
        let got = group_sids(&info).unwrap();
        assert_eq!(got, ms_pac_example_expected());
        assert_eq!(got[0], "S-1-5-21-397955417-626881126-188441444-3392609");
        assert_eq!(got.len(), 26 + 13);
        assert!(!got.contains(&"S-1-5-21-397955417-626881126-188441444-2914711".to_owned()));
    }

    #[test]
    fn windows_trust_with_resource_groups() {
        let got = group_sids(&unhex(TRUST_LOGON_INFO)).unwrap();
        assert_eq!(got, trust_expected());
        assert!(!got.contains(&"S-1-5-21-2284869408-3503417140-1141177250-1106".to_owned()));
    }

    #[test]
    fn gokrb5_test_domain_whole_pac() {
        let got = group_sids(&gokrb5_test_logon_info()).unwrap();
        assert_eq!(got, gokrb5_test_expected());
    }

    #[test]
    fn truncated_real_samples() {
        check_truncations(&ms_pac_logon_info(), &ms_pac_example_expected());
        check_truncations(&unhex(TRUST_LOGON_INFO), &trust_expected());
        check_truncations(&gokrb5_test_logon_info(), &gokrb5_test_expected());
    }

    #[test]
    fn huge_and_inconsistent_counts() {
        let good = unhex(TRUST_LOGON_INFO);
        assert_eq!(
            u32::from_le_bytes(good[GROUP_COUNT_AT..][..4].try_into().unwrap()),
            3
        );
        // GroupIds' conformant array: max count 3, then {1110, 7}.
        let group_array = find(&good, &unhex("03000000 56040000 07000000"));

        let mut buf = good.clone();
        put32(&mut buf, GROUP_COUNT_AT, 4000);
        put32(&mut buf, group_array, 4000);
        let e = err(&buf);
        assert!(e.contains("GroupIds count 4000 exceeds the buffer"), "{e}");

        let mut buf = good.clone();
        put32(&mut buf, GROUP_COUNT_AT, u32::MAX);
        put32(&mut buf, group_array, u32::MAX);
        assert!(err(&buf).contains("GroupIds count 4294967295 exceeds the buffer"));

        let mut buf = good.clone();
        put32(&mut buf, GROUP_COUNT_AT, 4);
        let e = err(&buf);
        assert!(
            e.contains("GroupIds array max count 3 does not match GroupCount 4"),
            "{e}"
        );

        // ExtraSids' conformant array: max count 1, then {referent 0x00020030, 7}.
        let extra_array = find(&good, &unhex("01000000 30000200 07000000"));
        let mut buf = good.clone();
        put32(&mut buf, SID_COUNT_AT, 0x1000_0000);
        put32(&mut buf, extra_array, 0x1000_0000);
        let e = err(&buf);
        assert!(
            e.contains("ExtraSids count 268435456 exceeds the buffer"),
            "{e}"
        );

        let mut buf = good;
        put32(&mut buf, SID_COUNT_AT, 2);
        let e = err(&buf);
        assert!(
            e.contains("ExtraSids array max count 1 does not match SidCount 2"),
            "{e}"
        );
    }

    #[test]
    fn bad_sub_authority_counts() {
        let good = unhex(TRUST_LOGON_INFO);
        // LogonDomainId: max count 4, revision 1, SubAuthorityCount 4, authority 5, 21.
        let domain = find(&good, &unhex("04000000 0104 000000000005 15000000"));

        let mut buf = good.clone();
        buf[domain + 5] = 200;
        let e = err(&buf);
        assert!(
            e.contains("LogonDomainId SubAuthorityCount 200 exceeds 15"),
            "{e}"
        );

        put32(&mut buf, domain, 200);
        assert!(err(&buf).contains("SubAuthorityCount 200 exceeds 15"));

        let mut buf = good.clone();
        put32(&mut buf, domain, 5);
        let e = err(&buf);
        assert!(
            e.contains("LogonDomainId max count 5 does not match its SubAuthorityCount 4"),
            "{e}"
        );

        let mut buf = good;
        buf[domain + 4] = 2;
        assert!(err(&buf).contains("LogonDomainId has revision 2"));
    }

    #[test]
    fn bad_headers() {
        let good = unhex(TRUST_LOGON_INFO);
        assert!(err(&[]).contains("0 bytes is shorter than the 16-byte"));
        assert!(err(&good[..15]).contains("15 bytes is shorter"));

        let mut buf = good.clone();
        buf[0] = 2;
        assert!(err(&buf).contains("bad header: serialisation version 2"));

        let mut buf = good.clone();
        buf[1] = 0x00;
        assert!(err(&buf).contains("bad header: data representation 0x00"));

        let mut buf = good.clone();
        buf[2] = 9;
        assert!(err(&buf).contains("bad header: common header length 9"));

        let mut buf = good.clone();
        put32(&mut buf, 8, (good.len() - HEADER_LEN + 1) as u32);
        assert!(err(&buf).contains("object buffer length 513 exceeds the 512 bytes"));

        let mut buf = good;
        put32(&mut buf, HEADER_LEN, 0);
        assert!(err(&buf).contains("null KERB_VALIDATION_INFO pointer"));
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic generator: byte flips all over the real samples.
        let samples = [
            ms_pac_logon_info(),
            unhex(TRUST_LOGON_INFO),
            gokrb5_test_logon_info(),
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for sample in &samples {
            for _ in 0..3000 {
                let mut buf = sample.clone();
                for _ in 0..4 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let at = (state % buf.len() as u64) as usize;
                    buf[at] = (state >> 32) as u8;
                }
                let _ = group_sids(&buf);
            }
        }
        for len in 0..64 {
            let _ = group_sids(&vec![0xff; len]);
            let _ = group_sids(&vec![0; len]);
        }
    }

    // ---------------------------------------------------------------------------------
    // Synthetic buffers for what the real samples lack
    // ---------------------------------------------------------------------------------

    /// An encoded `RPC_SID` with its conformant max count.
    fn sid_bytes(authority: u64, subs: &[u32]) -> Vec<u8> {
        let mut v = (subs.len() as u32).to_le_bytes().to_vec();
        v.push(1);
        v.push(subs.len() as u8);
        v.extend_from_slice(&authority.to_be_bytes()[2..]);
        for sub in subs {
            v.extend_from_slice(&sub.to_le_bytes());
        }
        v
    }

    fn nt(subs: &[u32]) -> Vec<u8> {
        sid_bytes(5, subs)
    }

    /// A test-only NDR encoder for `KERB_VALIDATION_INFO`, written from [MS-PAC] 2.5.
    struct Synth {
        user_id: u32,
        primary_group_id: u32,
        group_count: Option<u32>,
        groups: Option<Vec<u32>>,
        domain: Option<Vec<u8>>,
        extra: Option<Vec<Option<Vec<u8>>>>,
        resource_domain: Option<Vec<u8>>,
        resource_groups: Option<Vec<u32>>,
    }

    impl Default for Synth {
        fn default() -> Self {
            Synth {
                user_id: 1000,
                primary_group_id: 513,
                group_count: None,
                groups: Some(vec![513]),
                domain: Some(nt(&[21, 1, 2, 3])),
                extra: None,
                resource_domain: None,
                resource_groups: None,
            }
        }
    }

    impl Synth {
        fn encode(&self) -> Vec<u8> {
            let mut next = 0x0002_0000u32;
            let mut referent = |present: bool| {
                if present {
                    next += 4;
                    next
                } else {
                    0
                }
            };
            let string = |s: &str| -> Vec<u8> {
                let units: Vec<u16> = s.encode_utf16().collect();
                let mut v = Vec::new();
                for n in [units.len() as u32, 0, units.len() as u32] {
                    v.extend_from_slice(&n.to_le_bytes());
                }
                for u in units {
                    v.extend_from_slice(&u.to_le_bytes());
                }
                while v.len() % 4 != 0 {
                    v.push(0);
                }
                v
            };
            let memberships = |rids: &[u32]| -> Vec<u8> {
                let mut v = (rids.len() as u32).to_le_bytes().to_vec();
                for rid in rids {
                    v.extend_from_slice(&rid.to_le_bytes());
                    v.extend_from_slice(&7u32.to_le_bytes());
                }
                v
            };
            let names = ["alice", "", "", "", "", "", "DC1", "EXAMPLE"];
            let mut inline_strings = Vec::new();
            for name in names {
                let bytes = (name.len() * 2) as u16;
                let mut v = bytes.to_le_bytes().to_vec();
                v.extend_from_slice(&bytes.to_le_bytes());
                v.extend_from_slice(&referent(true).to_le_bytes());
                inline_strings.push(v);
            }

            let mut fixed = vec![0u8; 48];
            for s in &inline_strings[..6] {
                fixed.extend_from_slice(s);
            }
            fixed.extend_from_slice(&[0; 4]);
            fixed.extend_from_slice(&self.user_id.to_le_bytes());
            fixed.extend_from_slice(&self.primary_group_id.to_le_bytes());
            let groups_len = self.groups.as_ref().map_or(0, Vec::len) as u32;
            fixed.extend_from_slice(&self.group_count.unwrap_or(groups_len).to_le_bytes());
            fixed.extend_from_slice(&referent(self.groups.is_some()).to_le_bytes());
            fixed.extend_from_slice(&[0; 4 + 16]);
            fixed.extend_from_slice(&inline_strings[6]);
            fixed.extend_from_slice(&inline_strings[7]);
            fixed.extend_from_slice(&referent(self.domain.is_some()).to_le_bytes());
            fixed.extend_from_slice(&[0; 40]);
            let extra_len = self.extra.as_ref().map_or(0, Vec::len) as u32;
            fixed.extend_from_slice(&extra_len.to_le_bytes());
            fixed.extend_from_slice(&referent(self.extra.is_some()).to_le_bytes());
            fixed.extend_from_slice(&referent(self.resource_domain.is_some()).to_le_bytes());
            let resource_len = self.resource_groups.as_ref().map_or(0, Vec::len) as u32;
            fixed.extend_from_slice(&resource_len.to_le_bytes());
            fixed.extend_from_slice(&referent(self.resource_groups.is_some()).to_le_bytes());
            assert_eq!(fixed.len(), 216);

            let mut deferred = Vec::new();
            for name in &names[..6] {
                deferred.extend(string(name));
            }
            if let Some(groups) = &self.groups {
                deferred.extend(memberships(groups));
            }
            deferred.extend(string(names[6]));
            deferred.extend(string(names[7]));
            if let Some(domain) = &self.domain {
                deferred.extend_from_slice(domain);
            }
            if let Some(extra) = &self.extra {
                deferred.extend_from_slice(&extra_len.to_le_bytes());
                for sid in extra {
                    deferred.extend_from_slice(&referent(sid.is_some()).to_le_bytes());
                    deferred.extend_from_slice(&7u32.to_le_bytes());
                }
                for sid in extra.iter().flatten() {
                    deferred.extend_from_slice(sid);
                }
            }
            if let Some(domain) = &self.resource_domain {
                deferred.extend_from_slice(domain);
            }
            if let Some(groups) = &self.resource_groups {
                deferred.extend(memberships(groups));
            }

            let mut body = 0x0002_0000u32.to_le_bytes().to_vec();
            body.extend(fixed);
            body.extend(deferred);
            while body.len() % 8 != 0 {
                body.push(0);
            }
            let mut out = unhex("01100800 cccccccc");
            out.extend_from_slice(&(body.len() as u32).to_le_bytes());
            out.extend_from_slice(&[0; 4]);
            out.extend(body);
            out
        }
    }

    #[test]
    fn synthetic_default() {
        let buf = Synth::default().encode();
        assert_eq!(group_sids(&buf).unwrap(), ["S-1-5-21-1-2-3-513"]);
    }

    #[test]
    fn synthetic_everything() {
        let synth = Synth {
            user_id: 0,
            groups: Some(vec![513, 1100, 1100, 1101]),
            extra: Some(vec![
                // UserId is 0, so this first one is the account's own SID.
                Some(nt(&[21, 9, 9, 9, 1234])),
                None,
                Some(sid_bytes(18, &[1])),
                Some(sid_bytes(0x1234_5678_9abc, &[7])),
                Some(nt(&[21, 1, 2, 3, 1101])),
                Some(sid_bytes(1, &[])),
            ]),
            resource_domain: Some(nt(&[21, 4, 5, 6])),
            resource_groups: Some(vec![2000, 2001]),
            ..Synth::default()
        };
        let buf = synth.encode();
        let expected = [
            "S-1-5-21-1-2-3-513",
            "S-1-5-21-1-2-3-1100",
            "S-1-5-21-1-2-3-1101",
            "S-1-18-1",
            "S-1-0x123456789ABC-7",
            "S-1-1",
            "S-1-5-21-4-5-6-2000",
            "S-1-5-21-4-5-6-2001",
        ]
        .map(str::to_owned);
        assert_eq!(group_sids(&buf).unwrap(), expected);
        check_truncations(&buf, &expected);
    }

    #[test]
    fn synthetic_user_sid_never_reported() {
        let synth = Synth {
            groups: Some(vec![1000, 1001]),
            ..Synth::default()
        };
        let got = group_sids(&synth.encode()).unwrap();
        assert_eq!(got, ["S-1-5-21-1-2-3-1001", "S-1-5-21-1-2-3-513"]);
    }

    #[test]
    fn synthetic_null_pointers() {
        // No GroupIds: only the primary group.
        let synth = Synth {
            groups: None,
            group_count: Some(7),
            primary_group_id: 515,
            ..Synth::default()
        };
        assert_eq!(group_sids(&synth.encode()).unwrap(), ["S-1-5-21-1-2-3-515"]);

        // Resource groups without their domain SID cannot be named.
        let synth = Synth {
            resource_groups: Some(vec![2000]),
            ..Synth::default()
        };
        assert_eq!(group_sids(&synth.encode()).unwrap(), ["S-1-5-21-1-2-3-513"]);

        let synth = Synth {
            domain: None,
            ..Synth::default()
        };
        assert!(err(&synth.encode()).contains("LogonDomainId is null"));
    }

    #[test]
    fn synthetic_bad_sids_and_counts() {
        let mut bad = nt(&[21, 1, 2, 3]);
        bad[5] = 200;
        let synth = Synth {
            extra: Some(vec![Some(nt(&[21, 7])), Some(bad)]),
            ..Synth::default()
        };
        let e = err(&synth.encode());
        assert!(
            e.contains("ExtraSids[1] SubAuthorityCount 200 exceeds 15"),
            "{e}"
        );

        let synth = Synth {
            group_count: Some(5),
            groups: Some(vec![1, 2]),
            ..Synth::default()
        };
        let e = err(&synth.encode());
        assert!(
            e.contains("GroupIds array max count 2 does not match GroupCount 5"),
            "{e}"
        );

        let synth = Synth {
            resource_domain: Some(sid_bytes(5, &[0; 16])),
            ..Synth::default()
        };
        let e = err(&synth.encode());
        assert!(
            e.contains("ResourceGroupDomainSid SubAuthorityCount 16 exceeds 15"),
            "{e}"
        );
    }

    #[test]
    fn synthetic_string_lengths_checked() {
        let good = Synth::default().encode();
        // EffectiveName "alice": inline Length 10, MaximumLength 10; deferred 5, 0, 5.
        let at = find(&good, &unhex("05000000 00000000 05000000 6100"));
        let mut buf = good.clone();
        put32(&mut buf, at, 6);
        let e = err(&buf);
        assert!(
            e.contains("EffectiveName max count 6 does not match its MaximumLength of 10 bytes"),
            "{e}"
        );

        let mut buf = good.clone();
        put32(&mut buf, at + 4, 1);
        assert!(err(&buf).contains("EffectiveName has array offset 1"));

        let mut buf = good;
        put32(&mut buf, at + 8, 0x7fff_ffff);
        assert!(err(&buf).contains("EffectiveName actual count 2147483647 does not match"));
    }

    // ---------------------------------------------------------------------------------
    // Property tests: mutated real PACs, and a model of the SID rules over synthetic ones
    // ---------------------------------------------------------------------------------

    mod properties {
        use super::*;
        use carapace_fuzzkit::proptest;
        use carapace_fuzzkit::proptest::prelude::*;
        use carapace_fuzzkit::{bounded, bytes, config, mutated};

        fn samples() -> Vec<Vec<u8>> {
            vec![
                ms_pac_logon_info(),
                unhex(TRUST_LOGON_INFO),
                gokrb5_test_logon_info(),
                Synth::default().encode(),
            ]
        }

        fn well_formed(sid: &str) -> bool {
            let Some(rest) = sid.strip_prefix("S-1-") else {
                return false;
            };
            let mut parts = rest.split('-');
            let authority = parts.next().unwrap_or_default();
            let authority_ok = authority.bytes().all(|b| b.is_ascii_digit())
                || authority
                    .strip_prefix("0x")
                    .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            let subs: Vec<&str> = parts.collect();
            authority_ok
                && !authority.is_empty()
                && subs.len() <= MAX_SUB_AUTHORITIES as usize
                && subs
                    .iter()
                    .all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        }

        /// A SID as the model sees it: authority and sub-authorities.
        fn sid_model() -> impl Strategy<Value = (u64, Vec<u32>)> {
            (
                prop_oneof![Just(5u64), Just(18), 0..(1u64 << 48)],
                proptest::collection::vec(any::<u32>(), 0..=14),
            )
        }

        fn sid_text(authority: u64, subs: &[u32]) -> String {
            Sid {
                identifier_authority: authority,
                sub_authorities: subs.to_vec(),
            }
            .to_string()
        }

        proptest! {
            #![proptest_config(config(1500))]

            #[test]
            fn mutated_pacs_never_panic_and_reparse_the_same(
                buf in prop_oneof![1 => bytes(300), 8 => mutated(samples())],
            ) {
                let first = bounded("PAC logon info", buf.len(), || group_sids(&buf));
                match first {
                    Ok(sids) => {
                        // Accepted ⇒ the same SIDs again, each well formed and only once.
                        prop_assert_eq!(group_sids(&buf).unwrap(), sids.clone());
                        prop_assert!(sids.iter().all(|s| well_formed(s)), "{:?}", sids);
                        let unique: HashSet<&String> = sids.iter().collect();
                        prop_assert_eq!(unique.len(), sids.len());
                    }
                    Err(e) => prop_assert!(e.starts_with(CONTEXT), "{}", e),
                }
            }

            /// A 32-bit field of a real PAC, and every other aligned field equal to it
            /// (a count and the conformant max count that repeats it), set to a count of
            /// any magnitude: refused (or accepted) without allocating for what the
            /// buffer cannot hold.
            #[test]
            fn large_counts_anywhere_are_checked_before_allocating(
                sample in 0..4usize,
                slot in any::<usize>(),
                bits in 8..32u32,
                low in any::<u32>(),
            ) {
                let mut buf = samples().swap_remove(sample);
                let slots = (buf.len() - HEADER_LEN) / 4;
                let at = |i: usize| HEADER_LEN + i * 4;
                let read = |b: &[u8], i: usize| u32::from_le_bytes(b[at(i)..at(i) + 4].try_into().unwrap());
                let old = read(&buf, slot % slots);
                let new = (1u32 << bits) | (low & ((1u32 << bits) - 1)) >> 1;
                for i in 0..slots {
                    if read(&buf, i) == old {
                        put32(&mut buf, at(i), new);
                    }
                }
                if let Ok(sids) = bounded("PAC logon info", buf.len(), || group_sids(&buf)) {
                    prop_assert_eq!(group_sids(&buf).unwrap(), sids);
                }
            }

            /// Model-based: a KERB_VALIDATION_INFO encoded from arbitrary groups, extra SIDs
            /// and resource groups gives exactly the SIDs the module's rules name, in order.
            #[test]
            fn synthetic_pacs_give_exactly_the_modelled_sids(
                user_id in prop_oneof![Just(0u32), any::<u32>()],
                primary_group_id in any::<u32>(),
                domain_subs in proptest::collection::vec(any::<u32>(), 0..=14),
                groups in proptest::collection::vec(prop_oneof![Just(513u32), any::<u32>()], 0..6),
                extra in proptest::option::of(proptest::collection::vec(proptest::option::of(sid_model()), 0..5)),
                resource in proptest::option::of((sid_model(), proptest::collection::vec(any::<u32>(), 0..4))),
            ) {
                let synth = Synth {
                    user_id,
                    primary_group_id,
                    group_count: None,
                    groups: Some(groups.clone()),
                    domain: Some(nt(&domain_subs)),
                    extra: extra.clone().map(|list| {
                        list.into_iter()
                            .map(|sid| sid.map(|(authority, subs)| sid_bytes(authority, &subs)))
                            .collect()
                    }),
                    resource_domain: resource.as_ref().map(|((a, subs), _)| sid_bytes(*a, subs)),
                    resource_groups: resource.as_ref().map(|(_, rids)| rids.clone()),
                };
                let buf = synth.encode();
                let got = bounded("PAC logon info", buf.len(), || group_sids(&buf)).unwrap();

                let domain = |rid: u32| {
                    let mut subs = domain_subs.clone();
                    subs.push(rid);
                    sid_text(5, &subs)
                };
                let extra_sids: Vec<String> = extra
                    .iter()
                    .flatten()
                    .flatten()
                    .map(|(a, subs)| sid_text(*a, subs))
                    .collect();
                let mut seen = HashSet::new();
                if user_id != 0 {
                    seen.insert(domain(user_id));
                } else if let Some(first) = extra_sids.first() {
                    seen.insert(first.clone());
                }
                let mut want = Vec::new();
                let mut candidates: Vec<String> = groups.iter().map(|rid| domain(*rid)).collect();
                candidates.push(domain(primary_group_id));
                candidates.extend(extra_sids.iter().cloned());
                if let Some(((a, subs), rids)) = &resource {
                    for rid in rids {
                        let mut all = subs.clone();
                        all.push(*rid);
                        candidates.push(sid_text(*a, &all));
                    }
                }
                for sid in candidates {
                    if seen.insert(sid.clone()) {
                        want.push(sid);
                    }
                }
                prop_assert_eq!(got, want);
            }
        }
    }
}
