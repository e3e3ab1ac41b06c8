//! The few GSS-API calls Kerberos attestation makes, over MIT krb5's `libgssapi_krb5`,
//! wrapped in safe types. This is the crate's only unsafe code.
//!
//! Why hand-written bindings rather than the `libgssapi` crate: the two calls this
//! attestor depends on, `gss_acquire_cred_from` (a keytab and replay cache per
//! credential, never the process environment) and `gss_get_name_attribute` (the PAC),
//! are not in its safe API, and its `-sys` crate runs bindgen (libclang) at build time.
//! The structures below are the C declarations of `<gssapi/gssapi.h>` and
//! `<gssapi/gssapi_ext.h>` (MIT krb5 1.20) for Linux, where they are not packed.
//!
//! Ownership rules the wrappers keep:
//! - every `gss_name_t`, `gss_cred_id_t` and `gss_ctx_id_t` is owned by exactly one
//!   Rust value ([`Name`], [`Cred`], [`Context`]) that releases it in `Drop`;
//! - every output `gss_buffer_desc` is copied into a `Vec<u8>` and released at once
//!   with `gss_release_buffer` ([`OwnedBuffer`]);
//! - input buffers borrow Rust slices for the duration of one call only.
//!
//! MIT krb5 is thread-safe for distinct handles; a handle is never shared between
//! threads here (each attestation acquires its own credentials), so the wrappers are
//! `Send` but not `Sync`.
#![allow(
    unsafe_code,
    reason = "FFI to MIT krb5's GSS-API: each unsafe block states why its pointers are valid"
)]

use std::ffi::{CString, c_char, c_int, c_void};
use std::fmt;
use std::ptr;

#[allow(
    non_camel_case_types,
    reason = "the C type names of gssapi.h, so the declarations can be checked against it"
)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    pub(super) type OM_uint32 = u32;

    #[repr(C)]
    pub(super) struct gss_buffer_desc {
        pub(super) length: usize,
        pub(super) value: *mut c_void,
    }

    #[repr(C)]
    pub(super) struct gss_OID_desc {
        pub(super) length: OM_uint32,
        pub(super) elements: *mut c_void,
    }

    #[repr(C)]
    pub(super) struct gss_OID_set_desc {
        pub(super) count: usize,
        pub(super) elements: *mut gss_OID_desc,
    }

    #[repr(C)]
    pub(super) struct gss_channel_bindings_struct {
        pub(super) initiator_addrtype: OM_uint32,
        pub(super) initiator_address: gss_buffer_desc,
        pub(super) acceptor_addrtype: OM_uint32,
        pub(super) acceptor_address: gss_buffer_desc,
        pub(super) application_data: gss_buffer_desc,
    }

    #[repr(C)]
    pub(super) struct gss_key_value_element_desc {
        pub(super) key: *const c_char,
        pub(super) value: *const c_char,
    }

    #[repr(C)]
    pub(super) struct gss_key_value_set_desc {
        pub(super) count: OM_uint32,
        pub(super) elements: *const gss_key_value_element_desc,
    }

    /// Opaque handles.
    #[repr(C)]
    pub(super) struct gss_name_struct {
        _private: [u8; 0],
    }
    #[repr(C)]
    pub(super) struct gss_cred_id_struct {
        _private: [u8; 0],
    }
    #[repr(C)]
    pub(super) struct gss_ctx_id_struct {
        _private: [u8; 0],
    }
    pub(super) type gss_name_t = *mut gss_name_struct;
    pub(super) type gss_cred_id_t = *mut gss_cred_id_struct;
    pub(super) type gss_ctx_id_t = *mut gss_ctx_id_struct;
    pub(super) type gss_OID = *mut gss_OID_desc;

    pub(super) type krb5_context = *mut c_void;
    pub(super) type krb5_ccache = *mut c_void;

    #[link(name = "gssapi_krb5")]
    unsafe extern "C" {
        pub(super) fn gss_import_name(
            minor: *mut OM_uint32,
            input: *const gss_buffer_desc,
            name_type: *const gss_OID_desc,
            output: *mut gss_name_t,
        ) -> OM_uint32;
        pub(super) fn gss_release_name(minor: *mut OM_uint32, name: *mut gss_name_t) -> OM_uint32;
        pub(super) fn gss_display_name(
            minor: *mut OM_uint32,
            name: gss_name_t,
            output: *mut gss_buffer_desc,
            output_type: *mut gss_OID,
        ) -> OM_uint32;
        pub(super) fn gss_release_buffer(
            minor: *mut OM_uint32,
            buffer: *mut gss_buffer_desc,
        ) -> OM_uint32;
        pub(super) fn gss_display_status(
            minor: *mut OM_uint32,
            status: OM_uint32,
            status_type: c_int,
            mech: *const gss_OID_desc,
            message_context: *mut OM_uint32,
            output: *mut gss_buffer_desc,
        ) -> OM_uint32;
        pub(super) fn gss_acquire_cred_from(
            minor: *mut OM_uint32,
            desired_name: gss_name_t,
            time_req: OM_uint32,
            desired_mechs: *const gss_OID_set_desc,
            usage: c_int,
            cred_store: *const gss_key_value_set_desc,
            output_cred: *mut gss_cred_id_t,
            actual_mechs: *mut *mut gss_OID_set_desc,
            time_rec: *mut OM_uint32,
        ) -> OM_uint32;
        pub(super) fn gss_release_cred(
            minor: *mut OM_uint32,
            cred: *mut gss_cred_id_t,
        ) -> OM_uint32;
        pub(super) fn gss_init_sec_context(
            minor: *mut OM_uint32,
            cred: gss_cred_id_t,
            context: *mut gss_ctx_id_t,
            target: gss_name_t,
            mech: *const gss_OID_desc,
            req_flags: OM_uint32,
            time_req: OM_uint32,
            bindings: *const gss_channel_bindings_struct,
            input_token: *const gss_buffer_desc,
            actual_mech: *mut gss_OID,
            output_token: *mut gss_buffer_desc,
            ret_flags: *mut OM_uint32,
            time_rec: *mut OM_uint32,
        ) -> OM_uint32;
        pub(super) fn gss_accept_sec_context(
            minor: *mut OM_uint32,
            context: *mut gss_ctx_id_t,
            cred: gss_cred_id_t,
            input_token: *const gss_buffer_desc,
            bindings: *const gss_channel_bindings_struct,
            src_name: *mut gss_name_t,
            mech: *mut gss_OID,
            output_token: *mut gss_buffer_desc,
            ret_flags: *mut OM_uint32,
            time_rec: *mut OM_uint32,
            delegated_cred: *mut gss_cred_id_t,
        ) -> OM_uint32;
        pub(super) fn gss_delete_sec_context(
            minor: *mut OM_uint32,
            context: *mut gss_ctx_id_t,
            output_token: *mut gss_buffer_desc,
        ) -> OM_uint32;
        pub(super) fn gss_inquire_context(
            minor: *mut OM_uint32,
            context: gss_ctx_id_t,
            src_name: *mut gss_name_t,
            targ_name: *mut gss_name_t,
            lifetime: *mut OM_uint32,
            mech: *mut gss_OID,
            flags: *mut OM_uint32,
            locally_initiated: *mut c_int,
            open: *mut c_int,
        ) -> OM_uint32;
        pub(super) fn gss_get_name_attribute(
            minor: *mut OM_uint32,
            name: gss_name_t,
            attr: *const gss_buffer_desc,
            authenticated: *mut c_int,
            complete: *mut c_int,
            value: *mut gss_buffer_desc,
            display_value: *mut gss_buffer_desc,
            more: *mut c_int,
        ) -> OM_uint32;
    }

    /// The first fields of `gss_krb5_lucid_context_v1_t` (`<gssapi/gssapi_krb5.h>`);
    /// only read through a pointer the library returned, never allocated here.
    #[repr(C)]
    pub(super) struct lucid_context_prefix {
        pub(super) version: OM_uint32,
        pub(super) initiate: OM_uint32,
        pub(super) endtime: OM_uint32,
    }

    #[link(name = "gssapi_krb5")]
    unsafe extern "C" {
        pub(super) fn gss_krb5_export_lucid_sec_context(
            minor: *mut OM_uint32,
            context: *mut gss_ctx_id_t,
            version: OM_uint32,
            kctx: *mut *mut c_void,
        ) -> OM_uint32;
        pub(super) fn gss_krb5_free_lucid_sec_context(
            minor: *mut OM_uint32,
            kctx: *mut c_void,
        ) -> OM_uint32;
    }

    #[link(name = "krb5")]
    unsafe extern "C" {
        pub(super) fn krb5_init_context(context: *mut krb5_context) -> i32;
        pub(super) fn krb5_free_context(context: krb5_context);
        pub(super) fn krb5_cc_resolve(
            context: krb5_context,
            name: *const c_char,
            cache: *mut krb5_ccache,
        ) -> i32;
        pub(super) fn krb5_cc_destroy(context: krb5_context, cache: krb5_ccache) -> i32;
    }
}

use ffi::OM_uint32;

// Status codes (RFC 2744 §3.9.1): routine errors sit in bits 16-23, calling errors in
// 24-31, supplementary information in 0-15.
const GSS_S_COMPLETE: OM_uint32 = 0;
const GSS_S_CONTINUE_NEEDED: OM_uint32 = 1;
const ROUTINE_ERROR_MASK: OM_uint32 = 0xff << 16;
const CALLING_ERROR_MASK: OM_uint32 = 0xff << 24;
/// `GSS_S_BAD_BINDINGS`: the channel bindings in the token differ from the acceptor's.
pub(crate) const GSS_S_BAD_BINDINGS: OM_uint32 = 4 << 16;
/// `GSS_S_UNAVAILABLE`: e.g. a name attribute that is not there.
const GSS_S_UNAVAILABLE: OM_uint32 = 16 << 16;
const GSS_C_GSS_CODE: c_int = 1;
const GSS_C_MECH_CODE: c_int = 2;
const GSS_C_INDEFINITE: OM_uint32 = 0xffff_ffff;
const GSS_C_AF_UNSPEC: OM_uint32 = 0;
const GSS_C_INITIATE: c_int = 1;
const GSS_C_ACCEPT: c_int = 2;

/// `GSS_C_MUTUAL_FLAG`: the initiator asks for the acceptor's AP-REP.
pub(crate) const MUTUAL_FLAG: OM_uint32 = 2;
/// `GSS_C_CHANNEL_BOUND_FLAG` (MIT ≥ 1.19): the token carried channel bindings equal to
/// the acceptor's. MIT accepts a token without bindings even when the acceptor passes
/// some; only this flag tells the two apart.
pub(crate) const CHANNEL_BOUND_FLAG: OM_uint32 = 2048;

/// minor status `KRB5KRB_AP_ERR_REPEAT` (com_err table krb5, code 34): a replayed
/// authenticator, found in the replay cache.
pub(crate) const KRB5KRB_AP_ERR_REPEAT: OM_uint32 = 0x96C7_3A22;
/// minor status `KRB5KRB_AP_ERR_TKT_EXPIRED` (code 32).
pub(crate) const KRB5KRB_AP_ERR_TKT_EXPIRED: OM_uint32 = 0x96C7_3A20;
/// minor status `KRB5KRB_AP_ERR_TKT_NYV` (code 33): ticket not yet valid.
pub(crate) const KRB5KRB_AP_ERR_TKT_NYV: OM_uint32 = 0x96C7_3A21;
/// minor status `KRB5KRB_AP_WRONG_PRINC`: the ticket is for another principal than the
/// acceptor credential's.
pub(crate) const KRB5KRB_AP_WRONG_PRINC: OM_uint32 = 0x96C7_3A90;
/// minor status `KRB5KRB_AP_ERR_NOT_US`: the ticket is for a principal the acceptor
/// credential is not.
pub(crate) const KRB5KRB_AP_ERR_NOT_US: OM_uint32 = 0x96C7_3A23;
/// minor status `KRB5KRB_AP_ERR_NOKEY`: no key for the ticket's principal.
pub(crate) const KRB5KRB_AP_ERR_NOKEY: OM_uint32 = 0x96C7_3A2D;
/// minor status `KRB5KRB_AP_ERR_SKEW`: the authenticator's time is outside the skew.
pub(crate) const KRB5KRB_AP_ERR_SKEW: OM_uint32 = 0x96C7_3A25;
/// minor status `KRB5_KT_NOTFOUND`: no key in the keytab for the ticket's principal.
pub(crate) const KRB5_KT_NOTFOUND: OM_uint32 = 0x96C7_3AB5;
/// minor status `KRB5_KDC_UNREACH`: no KDC of the realm answered.
pub(crate) const KRB5_KDC_UNREACH: OM_uint32 = 0x96C7_3A9C;

// OIDs, DER content bytes (RFC 2744 §4, RFC 1964 §2.1.1).
static KRB5_MECH_BYTES: [u8; 9] = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x12, 0x01, 0x02, 0x02];
static NT_KRB5_PRINCIPAL_BYTES: [u8; 10] =
    [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x12, 0x01, 0x02, 0x02, 0x01];
static NT_HOSTBASED_SERVICE_BYTES: [u8; 10] =
    [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x12, 0x01, 0x02, 0x01, 0x04];

/// How a name string is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameType {
    /// `primary/instance@REALM`.
    Principal,
    /// `service@host` (or just `service` for this host).
    HostBasedService,
}

fn oid(bytes: &'static [u8]) -> ffi::gss_OID_desc {
    ffi::gss_OID_desc {
        length: bytes.len() as OM_uint32,
        // MIT never writes through an input OID; the cast only satisfies the C type.
        elements: bytes.as_ptr() as *mut c_void,
    }
}

fn in_buffer(bytes: &[u8]) -> ffi::gss_buffer_desc {
    ffi::gss_buffer_desc {
        length: bytes.len(),
        // An input buffer: the library reads `length` bytes and never writes.
        value: bytes.as_ptr() as *mut c_void,
    }
}

fn empty_buffer() -> ffi::gss_buffer_desc {
    ffi::gss_buffer_desc {
        length: 0,
        value: ptr::null_mut(),
    }
}

/// An output buffer the library allocated; copied out and released on drop.
struct OwnedBuffer(ffi::gss_buffer_desc);

impl OwnedBuffer {
    fn new() -> Self {
        OwnedBuffer(empty_buffer())
    }

    fn to_vec(&self) -> Vec<u8> {
        if self.0.value.is_null() || self.0.length == 0 {
            return Vec::new();
        }
        // SAFETY: the library filled `value` with `length` readable bytes, which stay
        // valid until gss_release_buffer in Drop.
        unsafe { std::slice::from_raw_parts(self.0.value as *const u8, self.0.length) }.to_vec()
    }
}

impl Drop for OwnedBuffer {
    fn drop(&mut self) {
        if !self.0.value.is_null() {
            let mut minor = 0;
            // SAFETY: the buffer was filled by a GSS call and is released once.
            unsafe { ffi::gss_release_buffer(&mut minor, &mut self.0) };
        }
    }
}

/// A failed GSS-API call: the major and minor status and their texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GssError {
    /// What was being done ("accepting the context token").
    pub(crate) what: &'static str,
    /// The major status (routine error in bits 16-23).
    pub(crate) major: OM_uint32,
    /// The mechanism's minor status (a krb5 com_err code).
    pub(crate) minor: OM_uint32,
    /// gss_display_status of both, joined.
    pub(crate) message: String,
}

impl GssError {
    fn new(what: &'static str, major: OM_uint32, minor: OM_uint32) -> Self {
        let mut parts = status_strings(major, GSS_C_GSS_CODE);
        if minor != 0 {
            parts.extend(status_strings(minor, GSS_C_MECH_CODE));
        }
        GssError {
            what,
            major,
            minor,
            message: parts.join("; "),
        }
    }

    /// The routine error part of the major status.
    pub(crate) fn routine(&self) -> OM_uint32 {
        self.major & ROUTINE_ERROR_MASK
    }
}

impl fmt::Display for GssError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.message)
    }
}

fn failed(major: OM_uint32) -> bool {
    major & (ROUTINE_ERROR_MASK | CALLING_ERROR_MASK) != 0
}

fn status_strings(status: OM_uint32, kind: c_int) -> Vec<String> {
    let mech = oid(&KRB5_MECH_BYTES);
    let mut out = Vec::new();
    let mut message_context: OM_uint32 = 0;
    // At most a handful of messages; the bound guards against a library that never
    // resets the context.
    for _ in 0..8 {
        let mut minor = 0;
        let mut buf = OwnedBuffer::new();
        // SAFETY: all pointers are to live locals; `buf` receives a library-allocated
        // string released by its Drop.
        let major = unsafe {
            ffi::gss_display_status(
                &mut minor,
                status,
                kind,
                &mech,
                &mut message_context,
                &mut buf.0,
            )
        };
        if failed(major) {
            break;
        }
        let text = String::from_utf8_lossy(&buf.to_vec()).trim().to_owned();
        if !text.is_empty() {
            out.push(text);
        }
        if message_context == 0 {
            break;
        }
    }
    if out.is_empty() {
        out.push(format!("status {status:#x}"));
    }
    out
}

/// A GSS name.
pub(crate) struct Name(ffi::gss_name_t);

// SAFETY: a gss_name_t is a heap object with no thread affinity; this wrapper owns it
// and is not Sync, so only one thread uses it at a time.
unsafe impl Send for Name {}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.display() {
            Ok(s) => write!(f, "Name({s})"),
            Err(_) => f.write_str("Name(?)"),
        }
    }
}

impl Name {
    /// Imports `text` as a name of `kind`.
    pub(crate) fn import(text: &str, kind: NameType) -> std::result::Result<Name, GssError> {
        let name_type = match kind {
            NameType::Principal => oid(&NT_KRB5_PRINCIPAL_BYTES),
            NameType::HostBasedService => oid(&NT_HOSTBASED_SERVICE_BYTES),
        };
        let input = in_buffer(text.as_bytes());
        let mut minor = 0;
        let mut out: ffi::gss_name_t = ptr::null_mut();
        // SAFETY: `input` borrows `text` for this call; `out` receives a new name that
        // this function's result owns.
        let major = unsafe { ffi::gss_import_name(&mut minor, &input, &name_type, &mut out) };
        if failed(major) {
            return Err(GssError::new("importing a name", major, minor));
        }
        Ok(Name(out))
    }

    /// The name as text (`host/node1.lab.test@LAB.TEST`).
    pub(crate) fn display(&self) -> std::result::Result<String, GssError> {
        let mut minor = 0;
        let mut buf = OwnedBuffer::new();
        // SAFETY: `self.0` is a live name; `buf` receives a library-allocated string.
        let major =
            unsafe { ffi::gss_display_name(&mut minor, self.0, &mut buf.0, ptr::null_mut()) };
        if failed(major) {
            return Err(GssError::new("displaying a name", major, minor));
        }
        String::from_utf8(buf.to_vec()).map_err(|_| GssError {
            what: "displaying a name",
            major: 0,
            minor: 0,
            message: "the name is not UTF-8".into(),
        })
    }

    /// The value of name attribute `attr` (e.g. `urn:mspac:logon-info`) if the name has
    /// it, with whether the mechanism authenticated it.
    pub(crate) fn attribute(
        &self,
        attr: &str,
    ) -> std::result::Result<Option<(Vec<u8>, bool)>, GssError> {
        let attr_buf = in_buffer(attr.as_bytes());
        let mut minor = 0;
        let mut authenticated: c_int = 0;
        let mut complete: c_int = 0;
        // -1 asks for the first value (RFC 6680 §7.5).
        let mut more: c_int = -1;
        let mut value = OwnedBuffer::new();
        let mut display = OwnedBuffer::new();
        // SAFETY: `attr_buf` borrows `attr` for this call; the outputs are live locals
        // and the two buffers are released by their Drop.
        let major = unsafe {
            ffi::gss_get_name_attribute(
                &mut minor,
                self.0,
                &attr_buf,
                &mut authenticated,
                &mut complete,
                &mut value.0,
                &mut display.0,
                &mut more,
            )
        };
        if major & ROUTINE_ERROR_MASK == GSS_S_UNAVAILABLE {
            return Ok(None);
        }
        if failed(major) {
            return Err(GssError::new("reading a name attribute", major, minor));
        }
        Ok(Some((value.to_vec(), authenticated != 0)))
    }
}

impl Drop for Name {
    fn drop(&mut self) {
        if !self.0.is_null() {
            let mut minor = 0;
            // SAFETY: the name is owned by this value and released once.
            unsafe { ffi::gss_release_name(&mut minor, &mut self.0) };
        }
    }
}

/// Credentials for one attestation.
pub(crate) struct Cred(ffi::gss_cred_id_t);

// SAFETY: as for Name: an owned heap handle, used by one thread at a time.
unsafe impl Send for Cred {}

impl fmt::Debug for Cred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cred")
    }
}

/// Which way credentials are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Usage {
    /// The agent: makes the context token.
    Initiate,
    /// The server: accepts it.
    Accept,
}

impl Cred {
    /// `gss_acquire_cred_from` for the krb5 mechanism with the credential store
    /// `store` (pairs such as `("keytab", "/etc/carapace/krb5.keytab")`), so that no
    /// process-wide environment variable is consulted or changed.
    pub(crate) fn acquire_from(
        name: Option<&Name>,
        usage: Usage,
        store: &[(&str, &str)],
    ) -> std::result::Result<Cred, GssError> {
        let strings: Vec<(CString, CString)> = store
            .iter()
            .map(|(k, v)| Ok((CString::new(*k)?, CString::new(*v)?)))
            .collect::<std::result::Result<_, std::ffi::NulError>>()
            .map_err(|_| GssError {
                what: "acquiring credentials",
                major: 0,
                minor: 0,
                message: "a credential store value holds a NUL byte".into(),
            })?;
        let elements: Vec<ffi::gss_key_value_element_desc> = strings
            .iter()
            .map(|(k, v)| ffi::gss_key_value_element_desc {
                key: k.as_ptr(),
                value: v.as_ptr(),
            })
            .collect();
        let set = ffi::gss_key_value_set_desc {
            count: elements.len() as OM_uint32,
            elements: elements.as_ptr(),
        };
        let mut mech = oid(&KRB5_MECH_BYTES);
        let mechs = ffi::gss_OID_set_desc {
            count: 1,
            elements: &mut mech,
        };
        let usage = match usage {
            Usage::Initiate => GSS_C_INITIATE,
            Usage::Accept => GSS_C_ACCEPT,
        };
        let mut minor = 0;
        let mut out: ffi::gss_cred_id_t = ptr::null_mut();
        // SAFETY: `set` points into `elements`, which points into `strings`; all three
        // and `mechs`/`mech` outlive the call. `name` is a live name or null
        // (GSS_C_NO_NAME). `out` receives a credential this function's result owns;
        // actual_mechs and time_rec are not requested (null).
        let major = unsafe {
            ffi::gss_acquire_cred_from(
                &mut minor,
                name.map_or(ptr::null_mut(), |n| n.0),
                GSS_C_INDEFINITE,
                &mechs,
                usage,
                &set,
                &mut out,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        if failed(major) {
            return Err(GssError::new("acquiring credentials", major, minor));
        }
        Ok(Cred(out))
    }
}

impl Drop for Cred {
    fn drop(&mut self) {
        if !self.0.is_null() {
            let mut minor = 0;
            // SAFETY: owned by this value, released once.
            unsafe { ffi::gss_release_cred(&mut minor, &mut self.0) };
        }
    }
}

/// Channel bindings carrying only application data (no addresses), as RFC 5056/5929
/// bindings do.
struct Bindings {
    cb: ffi::gss_channel_bindings_struct,
}

impl Bindings {
    fn new(application_data: &[u8]) -> Self {
        Bindings {
            cb: ffi::gss_channel_bindings_struct {
                initiator_addrtype: GSS_C_AF_UNSPEC,
                initiator_address: empty_buffer(),
                acceptor_addrtype: GSS_C_AF_UNSPEC,
                acceptor_address: empty_buffer(),
                application_data: in_buffer(application_data),
            },
        }
    }
}

/// A security context (either side).
pub(crate) struct Context {
    handle: ffi::gss_ctx_id_t,
    // Kept alive as long as the context that was made with it.
    _cred: Cred,
    target: Option<Name>,
}

// SAFETY: as for Name: an owned heap handle, used by one thread at a time.
unsafe impl Send for Context {}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Context")
    }
}

/// What accepting a context token established.
#[derive(Debug)]
pub(crate) struct Accepted {
    /// The initiator (`host/node1.lab.test@LAB.TEST`).
    pub(crate) source: Name,
    /// The service principal the ticket was for.
    pub(crate) target: String,
    /// The context flags (`CHANNEL_BOUND_FLAG`, `MUTUAL_FLAG`, ...).
    pub(crate) flags: OM_uint32,
    /// When the ticket ends (seconds since the epoch), exactly: MIT's acceptor accepts a
    /// ticket up to its clock skew (5 minutes) past its end, and its context lifetime
    /// includes that skew.
    pub(crate) ticket_endtime: OM_uint32,
    /// The AP-REP for mutual authentication, if the initiator asked for it.
    pub(crate) reply: Vec<u8>,
}

impl Context {
    /// The initiator: makes the first context token for `target` with `cred`, bound to
    /// `bindings`. With `mutual`, the acceptor's reply must be passed to
    /// [`Context::finish_initiator`].
    pub(crate) fn initiate(
        cred: Cred,
        target: Name,
        bindings: Option<&[u8]>,
        mutual: bool,
    ) -> std::result::Result<(Context, Vec<u8>), GssError> {
        let mut ctx = Context {
            handle: ptr::null_mut(),
            _cred: cred,
            target: Some(target),
        };
        let token = ctx.init_step(bindings, mutual, None)?;
        Ok((ctx, token))
    }

    /// The initiator's second step: verifies the acceptor's AP-REP.
    pub(crate) fn finish_initiator(
        &mut self,
        bindings: Option<&[u8]>,
        reply: &[u8],
    ) -> std::result::Result<(), GssError> {
        self.init_step(bindings, true, Some(reply)).map(|_| ())
    }

    fn init_step(
        &mut self,
        bindings: Option<&[u8]>,
        mutual: bool,
        input: Option<&[u8]>,
    ) -> std::result::Result<Vec<u8>, GssError> {
        let target = self.target.as_ref().map_or(ptr::null_mut(), |t| t.0);
        let cb = bindings.map(Bindings::new);
        let mech = oid(&KRB5_MECH_BYTES);
        let input_buf = input.map(in_buffer);
        let mut minor = 0;
        let mut out = OwnedBuffer::new();
        let mut ret_flags = 0;
        let flags = if mutual { MUTUAL_FLAG } else { 0 };
        // SAFETY: `self.handle` is null (first call) or the context the library made
        // on the first call; `_cred` and `target` are live; `cb` (or null: no
        // bindings), `mech` and `input_buf` outlive the call; `out` receives a token
        // released by its Drop.
        let major = unsafe {
            ffi::gss_init_sec_context(
                &mut minor,
                self._cred.0,
                &mut self.handle,
                target,
                &mech,
                flags,
                GSS_C_INDEFINITE,
                cb.as_ref().map_or(ptr::null(), |b| &b.cb as *const _),
                input_buf.as_ref().map_or(ptr::null(), |b| b as *const _),
                ptr::null_mut(),
                &mut out.0,
                &mut ret_flags,
                ptr::null_mut(),
            )
        };
        if failed(major) {
            return Err(GssError::new(
                "making the Kerberos context token",
                major,
                minor,
            ));
        }
        let expect_more = input.is_none() && mutual;
        let continue_needed = major & GSS_S_CONTINUE_NEEDED != 0;
        if continue_needed != expect_more {
            return Err(GssError {
                what: "making the Kerberos context token",
                major,
                minor,
                message: if continue_needed {
                    "the mechanism wants another round trip".into()
                } else {
                    "the mechanism did not ask for the acceptor's reply".into()
                },
            });
        }
        if mutual && input.is_some() && ret_flags & MUTUAL_FLAG == 0 {
            return Err(GssError {
                what: "verifying the server's reply",
                major,
                minor,
                message: "mutual authentication was not established".into(),
            });
        }
        Ok(out.to_vec())
    }

    /// The acceptor: accepts the initiator's single token with `cred`, checking
    /// `bindings`. Returns who the initiator is and what the ticket was for.
    pub(crate) fn accept(
        cred: Cred,
        token: &[u8],
        bindings: &[u8],
    ) -> std::result::Result<Accepted, GssError> {
        let mut ctx = Context {
            handle: ptr::null_mut(),
            _cred: cred,
            target: None,
        };
        let cb = Bindings::new(bindings);
        let input = in_buffer(token);
        let mut minor = 0;
        let mut src: ffi::gss_name_t = ptr::null_mut();
        let mut out = OwnedBuffer::new();
        let mut flags = 0;
        // SAFETY: `ctx.handle` is null so the library makes a new context owned by
        // `ctx`; the credential, bindings and input token outlive the call; `src`
        // receives a name wrapped (owned) right below; delegated credentials are not
        // requested (null).
        let major = unsafe {
            ffi::gss_accept_sec_context(
                &mut minor,
                &mut ctx.handle,
                ctx._cred.0,
                &input,
                &cb.cb,
                &mut src,
                ptr::null_mut(),
                &mut out.0,
                &mut flags,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        let source = Name(src);
        if failed(major) {
            return Err(GssError::new(
                "accepting the Kerberos context token",
                major,
                minor,
            ));
        }
        if major != GSS_S_COMPLETE {
            return Err(GssError {
                what: "accepting the Kerberos context token",
                major,
                minor,
                message: "the token did not complete the context in one step".into(),
            });
        }
        let target = ctx.target_name()?;
        let ticket_endtime = ctx.export_endtime()?;
        Ok(Accepted {
            source,
            target,
            flags,
            ticket_endtime,
            reply: out.to_vec(),
        })
    }

    /// The context's end time (the ticket's), read from MIT's lucid export of the
    /// context. The export consumes the context: nothing can be done with it after.
    fn export_endtime(&mut self) -> std::result::Result<OM_uint32, GssError> {
        let mut minor = 0;
        let mut lucid: *mut c_void = ptr::null_mut();
        // SAFETY: `self.handle` is an established context; the export takes it over
        // and sets the handle to GSS_C_NO_CONTEXT, so Drop does not delete it again.
        // `lucid` receives a version-1 lucid context freed below on every path.
        let major = unsafe {
            ffi::gss_krb5_export_lucid_sec_context(&mut minor, &mut self.handle, 1, &mut lucid)
        };
        if failed(major) || lucid.is_null() {
            return Err(GssError::new(
                "reading the context's end time",
                major,
                minor,
            ));
        }
        // SAFETY: a successful version-1 export points at a gss_krb5_lucid_context_v1_t,
        // whose first three fields are `lucid_context_prefix`'s (version, initiate,
        // endtime, each an OM_uint32, at the same offsets under repr(C)).
        let prefix = unsafe { &*(lucid as *const ffi::lucid_context_prefix) };
        let result = if prefix.version == 1 {
            Ok(prefix.endtime)
        } else {
            Err(GssError {
                what: "reading the context's end time",
                major: 0,
                minor: 0,
                message: format!("lucid context version {}", prefix.version),
            })
        };
        let _ = prefix.initiate;
        // SAFETY: `lucid` came from the export above and is freed once; `prefix` is not
        // used after this.
        unsafe { ffi::gss_krb5_free_lucid_sec_context(&mut minor, lucid) };
        result
    }

    fn target_name(&self) -> std::result::Result<String, GssError> {
        let mut minor = 0;
        let mut targ: ffi::gss_name_t = ptr::null_mut();
        // SAFETY: `self.handle` is an established context; only the target name is
        // requested, and it is wrapped (owned) right below.
        let major = unsafe {
            ffi::gss_inquire_context(
                &mut minor,
                self.handle,
                ptr::null_mut(),
                &mut targ,
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        let name = Name(targ);
        if failed(major) {
            return Err(GssError::new("reading the context's target", major, minor));
        }
        name.display()
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            let mut minor = 0;
            // SAFETY: the context is owned by this value and deleted once; no output
            // token is wanted.
            unsafe { ffi::gss_delete_sec_context(&mut minor, &mut self.handle, ptr::null_mut()) };
        }
    }
}

/// `KRB5_FCC_NOFILE`: the cache does not exist.
const KRB5_FCC_NOFILE: i32 = -1_765_328_189;

/// Destroys the MIT credential cache `name` (a `MEMORY:` cache an attestation used),
/// so the tickets it holds leave the process.
pub(crate) fn destroy_ccache(name: &str) -> std::result::Result<(), String> {
    let cname =
        CString::new(name).map_err(|_| "credential cache name holds a NUL byte".to_owned())?;
    let mut ctx: ffi::krb5_context = ptr::null_mut();
    // SAFETY: `ctx` receives a new context, freed below on every path.
    let code = unsafe { ffi::krb5_init_context(&mut ctx) };
    if code != 0 {
        return Err(format!("krb5_init_context failed with code {code}"));
    }
    let mut cache: ffi::krb5_ccache = ptr::null_mut();
    // SAFETY: `ctx` is live; `cname` outlives the call; `cache` receives a handle that
    // krb5_cc_destroy consumes.
    let mut code =
        unsafe { ffi::krb5_cc_resolve(ctx, cname.as_ptr() as *const c_char, &mut cache) };
    if code == 0 {
        // SAFETY: `cache` was resolved in `ctx` just now; destroy also closes it.
        code = unsafe { ffi::krb5_cc_destroy(ctx, cache) };
    }
    // SAFETY: `ctx` was initialised above and is freed once.
    unsafe { ffi::krb5_free_context(ctx) };
    // Nothing was cached: fine.
    if code != 0 && code != KRB5_FCC_NOFILE {
        return Err(format!(
            "destroying credential cache {name}: krb5 error {code}"
        ));
    }
    Ok(())
}
