//! NBD protocol codec (sans-IO): the server side of the fixed newstyle handshake, option
//! haggling, transmission request parsing and validation, and simple replies.
//!
//! The capture front-end (`capture::server`) owns the sockets; this module only turns bytes into
//! decisions and decisions into bytes, so every byte a client can send is handled here without
//! I/O and can be fuzzed. Nothing in here panics on input: a malformed handshake is a
//! [`HandshakeError`] (the connection is closed), a malformed request is an [`Action::Reject`]
//! (an error reply) or an [`Action::RejectAndClose`] / [`ProtocolError`] (the stream cannot be
//! trusted any more, so the connection is closed).
//!
//! Protocol reference: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.
//! Every integer on the wire is big-endian; the fixed-size headers are zerocopy structs of
//! unaligned big-endian fields so they can be read from any position of a buffer.
//!
//! Deliberately absent: TLS (`NBD_OPT_STARTTLS` → `NBD_REP_ERR_UNSUP`; exports are unix sockets
//! or loopback/management-network TCP), structured replies and metadata contexts (simple replies
//! carry everything READ needs), extended headers.

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `NBDMAGIC`: first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic, and the magic in front of every client option.
pub const IHAVEOPT_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Magic in front of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic in front of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic in front of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flags (client → server). Any other bit closes the connection (the spec's MUST).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (server → client, per export).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option codes (client → server).
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types (server → client). Errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;

/// Information types inside `NBD_REP_INFO` replies to `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command types (transmission requests).
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Longest export name the spec allows (a string "MUST be no longer than 4096 bytes").
pub const EXPORT_NAME_BYTES_MAX: usize = 4096;

/// Largest option payload the server accepts. The largest legitimate option is `NBD_OPT_GO`
/// with a 4096-byte name and a few info requests; anything much larger is a client we do not
/// want to buffer for, so the connection is closed.
pub const OPTION_DATA_BYTES_MAX: usize = 16 * 1024;

/// Options a client may send before the server gives up on it. A well-behaved client sends a
/// handful (qemu: STRUCTURED_REPLY, SET_META_CONTEXT, GO); this bounds a client that loops.
pub const OPTIONS_PER_CONNECTION_MAX: u32 = 256;

/// Size of a transmission request header on the wire.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Size of a simple reply header on the wire.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Size of a client option header on the wire.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Size of an option reply header on the wire.
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;

/// What the server sends first: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ServerGreeting {
    pub nbd_magic: U64,
    pub ihaveopt_magic: U64,
    pub handshake_flags: U16,
}

/// A client option header; `length` bytes of option data follow.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionHeader {
    pub magic: U64,
    pub option: U32,
    pub length: U32,
}

/// An option reply header; `length` bytes of reply data follow.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionReplyHeader {
    pub magic: U64,
    pub option: U32,
    pub reply_type: U32,
    pub length: U32,
}

/// A transmission request header; `length` bytes of payload follow for `NBD_CMD_WRITE` only.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RequestHeader {
    pub magic: U32,
    pub flags: U16,
    pub command: U16,
    pub cookie: U64,
    pub offset: U64,
    pub length: U32,
}

/// A simple reply header; for a successful `NBD_CMD_READ` the data follows.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SimpleReplyHeader {
    pub magic: U32,
    pub error: U32,
    pub cookie: U64,
}

const _: () = assert!(core::mem::size_of::<ServerGreeting>() == 18);
const _: () = assert!(core::mem::size_of::<OptionHeader>() == OPTION_HEADER_BYTES);
const _: () = assert!(core::mem::size_of::<OptionReplyHeader>() == OPTION_REPLY_HEADER_BYTES);
const _: () = assert!(core::mem::size_of::<RequestHeader>() == REQUEST_HEADER_BYTES);
const _: () = assert!(core::mem::size_of::<SimpleReplyHeader>() == SIMPLE_REPLY_BYTES);

/// Error values of simple replies (errno numbers as the protocol fixes them, not the host's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    Ok = 0,
    /// Write to a read-only export.
    Perm = 1,
    /// The disk failed the I/O.
    Io = 5,
    NoMem = 12,
    /// Bad flags, misaligned, read/trim past the end, zero length, unknown command.
    Inval = 22,
    /// Write past the end of the export.
    NoSpc = 28,
    /// Request longer than the maximum block size.
    Overflow = 75,
    NotSup = 95,
    /// The server is shutting down; the client must disconnect.
    Shutdown = 108,
}

impl ErrorCode {
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// The protocol's name of the error, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Perm => "EPERM",
            Self::Io => "EIO",
            Self::NoMem => "ENOMEM",
            Self::Inval => "EINVAL",
            Self::NoSpc => "ENOSPC",
            Self::Overflow => "EOVERFLOW",
            Self::NotSup => "ENOTSUP",
            Self::Shutdown => "ESHUTDOWN",
        }
    }
}

/// Block size constraints advertised in `NBD_INFO_BLOCK_SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Requests must be aligned to this (offset and length), if the client agreed to it.
    pub minimum_bytes: u32,
    /// The size the client should prefer (read-modify-write below it is costly).
    pub preferred_bytes: u32,
    /// Largest READ/WRITE payload the server accepts.
    pub maximum_bytes: u32,
}

impl BlockSizes {
    /// Ferry's defaults: 512-byte minimum (every disk's logical sector), 4 KiB preferred (page
    /// and O_DIRECT granularity), 32 MiB maximum (the de-facto limit of qemu and libnbd).
    pub const DEFAULT: Self = Self {
        minimum_bytes: 512,
        preferred_bytes: 4096,
        maximum_bytes: 32 << 20,
    };

    /// Whether the constraints are self-consistent (powers of two, min ≤ preferred ≤ max).
    pub fn is_valid(&self) -> bool {
        self.minimum_bytes.is_power_of_two()
            && self.preferred_bytes.is_power_of_two()
            && self.minimum_bytes <= self.preferred_bytes
            && self.preferred_bytes <= self.maximum_bytes
    }
}

/// One export the server offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// `<machine>/<disk>`.
    pub name: String,
    pub size_bytes: u64,
    /// Shown by `nbdinfo --list`.
    pub description: String,
}

/// What a listener offers during the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    pub exports: Vec<ExportInfo>,
    /// The export served under the empty name (a socket that serves one disk).
    pub default_export: Option<usize>,
    pub block_sizes: BlockSizes,
    /// Transmission flags sent for every export (`FLAG_HAS_FLAGS` is always added).
    pub transmission_flags: u16,
}

impl ServerConfig {
    /// Flags of a writable export with FLUSH, FUA, TRIM, WRITE_ZEROES, and multi-connection
    /// (a FLUSH on any connection covers writes completed on every connection: the journal
    /// and the disk are shared).
    pub const WRITABLE_FLAGS: u16 = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;

    /// A config offering `exports`, each writable; one export is also the default export.
    pub fn new(exports: Vec<ExportInfo>) -> Self {
        let default_export = if exports.len() == 1 { Some(0) } else { None };
        Self {
            exports,
            default_export,
            block_sizes: BlockSizes::DEFAULT,
            transmission_flags: Self::WRITABLE_FLAGS,
        }
    }

    fn find_export(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() {
            return self.default_export;
        }
        self.exports
            .iter()
            .position(|export| export.name.as_bytes() == name)
    }
}

/// What the handshake agreed; the transmission phase runs under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Index into `ServerConfig::exports`.
    pub export_index: usize,
    pub size_bytes: u64,
    pub transmission_flags: u16,
    /// Whether the client asked for `NBD_INFO_BLOCK_SIZE` and so agreed to honour the minimum
    /// block size. A client that did not (`NBD_OPT_EXPORT_NAME`, or GO without it) may send
    /// requests aligned to 1 byte, and the spec says the server must then accept them.
    pub block_sizes_agreed: bool,
    pub block_sizes: BlockSizes,
}

impl Negotiated {
    /// The request validator for this export.
    pub fn validator(&self) -> RequestValidator {
        RequestValidator {
            size_bytes: self.size_bytes,
            alignment_bytes: if self.block_sizes_agreed {
                self.block_sizes.minimum_bytes
            } else {
                1
            },
            payload_bytes_max: self.block_sizes.maximum_bytes,
            transmission_flags: self.transmission_flags,
        }
    }
}

/// Why the handshake closed the connection. Each variant is one clear log line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("client flags {flags:#x} carry bits this server never offered")]
    BadClientFlags { flags: u32 },
    #[error("option header has magic {found:#018x}, expected IHAVEOPT")]
    BadOptionMagic { found: u64 },
    #[error(
        "option {option} carries {length} bytes, more than the {OPTION_DATA_BYTES_MAX} accepted"
    )]
    OptionTooLarge { option: u32, length: u32 },
    #[error("NBD_OPT_EXPORT_NAME asked for unknown export {name:?}")]
    UnknownExport { name: String },
    #[error(
        "client sent more than {OPTIONS_PER_CONNECTION_MAX} options without choosing an export"
    )]
    TooManyOptions,
    #[error("input after the handshake finished")]
    Finished,
}

/// What one call of [`Handshake::handle_input`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeEvent {
    /// Not enough bytes for the next message; read at least `bytes_needed` more in total.
    NeedMore { bytes_needed: usize },
    /// An option was answered (see `take_output`); call again with the remaining input.
    Continue,
    /// Transmission begins: send the output, then serve requests.
    Ready(Negotiated),
    /// The client sent `NBD_OPT_ABORT`: send the output, then close.
    Aborted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    ClientFlags,
    Options,
    Done,
}

/// The server side of the fixed newstyle handshake as a state machine: bytes in through
/// [`handle_input`](Self::handle_input), bytes out through [`take_output`](Self::take_output).
#[derive(Debug)]
pub struct Handshake {
    config: ServerConfig,
    phase: Phase,
    no_zeroes: bool,
    options_seen: u32,
    output: Vec<u8>,
}

impl Handshake {
    /// Starts a handshake; the greeting is queued as the first output.
    pub fn new(config: ServerConfig) -> Self {
        assert!(
            config.block_sizes.is_valid(),
            "block sizes {:?} are inconsistent",
            config.block_sizes
        );
        assert!(config
            .default_export
            .is_none_or(|index| index < config.exports.len()));
        let greeting = ServerGreeting {
            nbd_magic: NBD_MAGIC.into(),
            ihaveopt_magic: IHAVEOPT_MAGIC.into(),
            handshake_flags: (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).into(),
        };
        Self {
            config,
            phase: Phase::ClientFlags,
            no_zeroes: false,
            options_seen: 0,
            output: greeting.as_bytes().to_vec(),
        }
    }

    /// Bytes to send to the client, in order; the buffer is handed over and emptied.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Consumes at most one client message from the front of `input`. Returns how many bytes
    /// were consumed and what happened. Call again with the rest while it returns `Continue`.
    pub fn handle_input(
        &mut self,
        input: &[u8],
    ) -> Result<(usize, HandshakeEvent), HandshakeError> {
        match self.phase {
            Phase::Done => Err(HandshakeError::Finished),
            Phase::ClientFlags => {
                let Some(flags_bytes) = input.get(..4) else {
                    return Ok((0, HandshakeEvent::NeedMore { bytes_needed: 4 }));
                };
                let flags = u32::from_be_bytes([
                    flags_bytes[0],
                    flags_bytes[1],
                    flags_bytes[2],
                    flags_bytes[3],
                ]);
                if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                    self.phase = Phase::Done;
                    return Err(HandshakeError::BadClientFlags { flags });
                }
                self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                self.phase = Phase::Options;
                Ok((4, HandshakeEvent::Continue))
            }
            Phase::Options => self.handle_option(input),
        }
    }

    fn handle_option(&mut self, input: &[u8]) -> Result<(usize, HandshakeEvent), HandshakeError> {
        let Ok((header, _)) = OptionHeader::read_from_prefix(input) else {
            return Ok((
                0,
                HandshakeEvent::NeedMore {
                    bytes_needed: OPTION_HEADER_BYTES,
                },
            ));
        };
        if header.magic.get() != IHAVEOPT_MAGIC {
            self.phase = Phase::Done;
            return Err(HandshakeError::BadOptionMagic {
                found: header.magic.get(),
            });
        }
        let option = header.option.get();
        let length = header.length.get();
        if length as usize > OPTION_DATA_BYTES_MAX {
            self.phase = Phase::Done;
            return Err(HandshakeError::OptionTooLarge { option, length });
        }
        let total = OPTION_HEADER_BYTES + length as usize;
        let Some(data) = input.get(OPTION_HEADER_BYTES..total) else {
            return Ok((
                0,
                HandshakeEvent::NeedMore {
                    bytes_needed: total,
                },
            ));
        };
        self.options_seen += 1;
        if self.options_seen > OPTIONS_PER_CONNECTION_MAX {
            self.phase = Phase::Done;
            return Err(HandshakeError::TooManyOptions);
        }
        let event = match option {
            OPT_EXPORT_NAME => self.option_export_name(data)?,
            OPT_ABORT => {
                self.push_option_reply(option, REP_ACK, &[]);
                self.phase = Phase::Done;
                HandshakeEvent::Aborted
            }
            OPT_LIST => {
                self.option_list(data);
                HandshakeEvent::Continue
            }
            OPT_INFO | OPT_GO => self.option_info_or_go(option, data),
            // Known but deliberately unsupported (see the module comment); unknown options get
            // the same answer, which is what fixed newstyle is for.
            _ => {
                self.push_option_error(
                    option,
                    REP_ERR_UNSUP,
                    "option not supported by this server",
                );
                HandshakeEvent::Continue
            }
        };
        Ok((total, event))
    }

    fn option_export_name(&mut self, name: &[u8]) -> Result<HandshakeEvent, HandshakeError> {
        // This option cannot be answered with an error; an unknown name closes the connection.
        let Some(export_index) = self.config.find_export(name) else {
            self.phase = Phase::Done;
            return Err(HandshakeError::UnknownExport {
                name: String::from_utf8_lossy(name).into_owned(),
            });
        };
        let negotiated = self.negotiated(export_index, false);
        self.output
            .extend_from_slice(&negotiated.size_bytes.to_be_bytes());
        self.output
            .extend_from_slice(&negotiated.transmission_flags.to_be_bytes());
        if !self.no_zeroes {
            self.output.extend_from_slice(&[0u8; 124]);
        }
        self.phase = Phase::Done;
        Ok(HandshakeEvent::Ready(negotiated))
    }

    fn option_list(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.push_option_error(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST carries no data");
            return;
        }
        for index in 0..self.config.exports.len() {
            let name = self.config.exports[index].name.clone();
            let mut reply = Vec::with_capacity(4 + name.len());
            reply.extend_from_slice(&(name.len() as u32).to_be_bytes());
            reply.extend_from_slice(name.as_bytes());
            self.push_option_reply(OPT_LIST, REP_SERVER, &reply);
        }
        self.push_option_reply(OPT_LIST, REP_ACK, &[]);
    }

    fn option_info_or_go(&mut self, option: u32, data: &[u8]) -> HandshakeEvent {
        let Some(request) = parse_info_request(data) else {
            self.push_option_error(
                option,
                REP_ERR_INVALID,
                "malformed NBD_OPT_INFO/NBD_OPT_GO data",
            );
            return HandshakeEvent::Continue;
        };
        let Some(export_index) = self.config.find_export(request.name) else {
            let message = format!(
                "no export named {:?}",
                String::from_utf8_lossy(request.name)
            );
            self.push_option_error(option, REP_ERR_UNKNOWN, &message);
            return HandshakeEvent::Continue;
        };
        let block_sizes_agreed = request.info_types().any(|info| info == INFO_BLOCK_SIZE);
        let negotiated = self.negotiated(export_index, block_sizes_agreed);

        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        export.extend_from_slice(&negotiated.size_bytes.to_be_bytes());
        export.extend_from_slice(&negotiated.transmission_flags.to_be_bytes());
        self.push_option_reply(option, REP_INFO, &export);

        // Sent whether asked or not (the spec allows it): a client that ignores it still learns
        // the preferred and maximum sizes; only one that asked is held to the minimum.
        let sizes = negotiated.block_sizes;
        let mut block_size = Vec::with_capacity(14);
        block_size.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        block_size.extend_from_slice(&sizes.minimum_bytes.to_be_bytes());
        block_size.extend_from_slice(&sizes.preferred_bytes.to_be_bytes());
        block_size.extend_from_slice(&sizes.maximum_bytes.to_be_bytes());
        self.push_option_reply(option, REP_INFO, &block_size);

        let export_info = &self.config.exports[export_index];
        let (name, description) = (export_info.name.clone(), export_info.description.clone());
        if request.info_types().any(|info| info == INFO_NAME) {
            let mut reply = INFO_NAME.to_be_bytes().to_vec();
            reply.extend_from_slice(name.as_bytes());
            self.push_option_reply(option, REP_INFO, &reply);
        }
        if request.info_types().any(|info| info == INFO_DESCRIPTION) && !description.is_empty() {
            let mut reply = INFO_DESCRIPTION.to_be_bytes().to_vec();
            reply.extend_from_slice(description.as_bytes());
            self.push_option_reply(option, REP_INFO, &reply);
        }
        self.push_option_reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            self.phase = Phase::Done;
            HandshakeEvent::Ready(negotiated)
        } else {
            HandshakeEvent::Continue
        }
    }

    fn negotiated(&self, export_index: usize, block_sizes_agreed: bool) -> Negotiated {
        Negotiated {
            export_index,
            size_bytes: self.config.exports[export_index].size_bytes,
            transmission_flags: self.config.transmission_flags | FLAG_HAS_FLAGS,
            block_sizes_agreed,
            block_sizes: self.config.block_sizes,
        }
    }

    fn push_option_reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        let header = OptionReplyHeader {
            magic: OPTION_REPLY_MAGIC.into(),
            option: option.into(),
            reply_type: reply_type.into(),
            length: (data.len() as u32).into(),
        };
        self.output.extend_from_slice(header.as_bytes());
        self.output.extend_from_slice(data);
    }

    fn push_option_error(&mut self, option: u32, reply_type: u32, message: &str) {
        self.push_option_reply(option, reply_type, message.as_bytes());
    }
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: name, then the requested information types.
struct InfoRequest<'a> {
    name: &'a [u8],
    info_bytes: &'a [u8],
}

impl InfoRequest<'_> {
    fn info_types(&self) -> impl Iterator<Item = u16> + '_ {
        self.info_bytes
            .chunks_exact(2)
            .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
    }
}

fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let name_len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    if name_len > EXPORT_NAME_BYTES_MAX {
        return None;
    }
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let info_bytes = &rest[2..];
    if info_bytes.len() != count * 2 {
        return None;
    }
    Some(InfoRequest { name, info_bytes })
}

/// A decoded transmission request header (not yet validated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub cookie: u64,
    pub command: u16,
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
}

/// Transmission-phase input that ends the connection: the stream is out of step.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("request header has magic {found:#010x}, expected {REQUEST_MAGIC:#010x}")]
    BadRequestMagic { found: u32 },
}

/// Decodes a request header from the front of `input`: `Ok(None)` until
/// [`REQUEST_HEADER_BYTES`] are available.
pub fn decode_request(input: &[u8]) -> Result<Option<Request>, ProtocolError> {
    let Ok((header, _)) = RequestHeader::read_from_prefix(input) else {
        return Ok(None);
    };
    if header.magic.get() != REQUEST_MAGIC {
        return Err(ProtocolError::BadRequestMagic {
            found: header.magic.get(),
        });
    }
    Ok(Some(Request {
        cookie: header.cookie.get(),
        command: header.command.get(),
        flags: header.flags.get(),
        offset: header.offset.get(),
        length: header.length.get(),
    }))
}

/// Why a request was refused; printed in the one log line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("range {offset}+{length} ends past the export's {size_bytes} bytes")]
    OutOfRange {
        offset: u64,
        length: u32,
        size_bytes: u64,
    },
    #[error("range {offset}+{length} is not aligned to {alignment_bytes} bytes")]
    Misaligned {
        offset: u64,
        length: u32,
        alignment_bytes: u32,
    },
    #[error("length {length} exceeds the maximum payload of {payload_bytes_max} bytes")]
    TooLarge { length: u32, payload_bytes_max: u32 },
    #[error("zero-length request")]
    ZeroLength,
    #[error("command flags {flags:#x} not valid for command {command}")]
    BadFlags { command: u16, flags: u16 },
    #[error("NBD_CMD_FLUSH with offset {offset} / length {length} (both must be 0)")]
    FlushWithRange { offset: u64, length: u32 },
    #[error("command {command} is not supported")]
    UnsupportedCommand { command: u16 },
    #[error("write to a read-only export")]
    ReadOnly,
}

/// What the server should do with one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Read {
        cookie: u64,
        offset: u64,
        length: u32,
    },
    /// `length` payload bytes follow the header; read them, then apply.
    Write {
        cookie: u64,
        offset: u64,
        length: u32,
        fua: bool,
    },
    /// `no_hole` asks for allocated zeroes rather than a hole; both read back as zeroes.
    WriteZeroes {
        cookie: u64,
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
    },
    Trim {
        cookie: u64,
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush {
        cookie: u64,
    },
    /// `NBD_CMD_DISC`: finish in-flight requests, then close; no reply.
    Disconnect,
    /// Reply `error` without touching the disk, after reading and discarding
    /// `discard_payload_bytes` (the payload of a refused WRITE).
    Reject {
        cookie: u64,
        error: ErrorCode,
        discard_payload_bytes: u32,
        reason: RejectReason,
    },
    /// Reply `error`, then close: the request announced a payload too large to read and drop,
    /// so the stream cannot be resynchronised.
    RejectAndClose {
        cookie: u64,
        error: ErrorCode,
        reason: RejectReason,
    },
}

impl Action {
    /// Whether this action changes the disk (and so is journaled).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Self::Write { .. } | Self::WriteZeroes { .. } | Self::Trim { .. }
        )
    }
}

/// Checks requests against the negotiated export: range, alignment, payload size, flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestValidator {
    pub size_bytes: u64,
    /// 1 unless the client agreed to the advertised minimum block size.
    pub alignment_bytes: u32,
    pub payload_bytes_max: u32,
    pub transmission_flags: u16,
}

impl RequestValidator {
    /// Decides what to do with `request`. Total: every request maps to an action.
    ///
    /// Error choices follow the spec's "Error values" section: writes past the end → ENOSPC;
    /// reads, trims and zeroing past the end, misalignment, bad flags, zero length → EINVAL;
    /// READ or WRITE longer than the maximum block size → EOVERFLOW (for a WRITE the payload
    /// is not read, so the connection closes after the reply). TRIM and WRITE_ZEROES carry no
    /// payload and may be longer than the maximum block size (a guest's mkfs discards the
    /// whole disk in one request).
    pub fn decide(&self, request: &Request) -> Action {
        let Request {
            cookie,
            command,
            flags,
            offset,
            length,
        } = *request;
        let fua = flags & CMD_FLAG_FUA != 0;
        let reject = |error: ErrorCode, reason: RejectReason| {
            let discard_payload_bytes = if command == CMD_WRITE { length } else { 0 };
            Action::Reject {
                cookie,
                error,
                discard_payload_bytes,
                reason,
            }
        };
        let read_only = self.transmission_flags & FLAG_READ_ONLY != 0;
        match command {
            CMD_DISC => Action::Disconnect,
            CMD_FLUSH => {
                if flags & !CMD_FLAG_FUA != 0 {
                    return reject(ErrorCode::Inval, RejectReason::BadFlags { command, flags });
                }
                if offset != 0 || length != 0 {
                    return reject(
                        ErrorCode::Inval,
                        RejectReason::FlushWithRange { offset, length },
                    );
                }
                Action::Flush { cookie }
            }
            CMD_READ | CMD_WRITE => {
                if length > self.payload_bytes_max {
                    let reason = RejectReason::TooLarge {
                        length,
                        payload_bytes_max: self.payload_bytes_max,
                    };
                    if command == CMD_WRITE {
                        return Action::RejectAndClose {
                            cookie,
                            error: ErrorCode::Overflow,
                            reason,
                        };
                    }
                    return reject(ErrorCode::Overflow, reason);
                }
                // FUA is meaningless on a read but harmless; anything else is an error.
                if flags & !CMD_FLAG_FUA != 0 {
                    return reject(ErrorCode::Inval, RejectReason::BadFlags { command, flags });
                }
                if command == CMD_WRITE && read_only {
                    return reject(ErrorCode::Perm, RejectReason::ReadOnly);
                }
                let out_of_range_error = if command == CMD_WRITE {
                    ErrorCode::NoSpc
                } else {
                    ErrorCode::Inval
                };
                if let Err((error, reason)) = self.check_range(offset, length, out_of_range_error) {
                    return reject(error, reason);
                }
                if command == CMD_READ {
                    Action::Read {
                        cookie,
                        offset,
                        length,
                    }
                } else {
                    Action::Write {
                        cookie,
                        offset,
                        length,
                        fua,
                    }
                }
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                let allowed = if command == CMD_TRIM {
                    CMD_FLAG_FUA
                } else {
                    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE
                };
                let advertised = if command == CMD_TRIM {
                    FLAG_SEND_TRIM
                } else {
                    FLAG_SEND_WRITE_ZEROES
                };
                if self.transmission_flags & advertised == 0 {
                    return reject(
                        ErrorCode::Inval,
                        RejectReason::UnsupportedCommand { command },
                    );
                }
                if flags & !allowed != 0 {
                    return reject(ErrorCode::Inval, RejectReason::BadFlags { command, flags });
                }
                if read_only {
                    return reject(ErrorCode::Perm, RejectReason::ReadOnly);
                }
                if let Err((error, reason)) = self.check_range(offset, length, ErrorCode::Inval) {
                    return reject(error, reason);
                }
                if command == CMD_TRIM {
                    Action::Trim {
                        cookie,
                        offset,
                        length,
                        fua,
                    }
                } else {
                    Action::WriteZeroes {
                        cookie,
                        offset,
                        length,
                        fua,
                        no_hole: flags & CMD_FLAG_NO_HOLE != 0,
                    }
                }
            }
            // CACHE, BLOCK_STATUS and anything newer are never advertised, so a client must not
            // send them; none carries a payload without extended headers.
            _ => reject(
                ErrorCode::Inval,
                RejectReason::UnsupportedCommand { command },
            ),
        }
    }

    fn check_range(
        &self,
        offset: u64,
        length: u32,
        out_of_range_error: ErrorCode,
    ) -> Result<(), (ErrorCode, RejectReason)> {
        if length == 0 {
            return Err((ErrorCode::Inval, RejectReason::ZeroLength));
        }
        let in_range = offset
            .checked_add(u64::from(length))
            .is_some_and(|end| end <= self.size_bytes);
        if !in_range {
            let reason = RejectReason::OutOfRange {
                offset,
                length,
                size_bytes: self.size_bytes,
            };
            return Err((out_of_range_error, reason));
        }
        let alignment = u64::from(self.alignment_bytes.max(1));
        if offset % alignment != 0 || u64::from(length) % alignment != 0 {
            let reason = RejectReason::Misaligned {
                offset,
                length,
                alignment_bytes: self.alignment_bytes,
            };
            return Err((ErrorCode::Inval, reason));
        }
        Ok(())
    }
}

/// Encodes a simple reply header (for a successful READ, the data follows it).
pub fn encode_simple_reply(cookie: u64, error: ErrorCode) -> [u8; SIMPLE_REPLY_BYTES] {
    let header = SimpleReplyHeader {
        magic: SIMPLE_REPLY_MAGIC.into(),
        error: error.as_u32().into(),
        cookie: cookie.into(),
    };
    let mut out = [0u8; SIMPLE_REPLY_BYTES];
    out.copy_from_slice(header.as_bytes());
    out
}

/// Client-side encoders: the bad-input tests and the fuzz tests speak to the server with them.
pub mod client {
    use super::*;

    /// Runs a client's whole byte stream through the server's codec the way a connection does
    /// (the handshake, then request headers, skipping each write's payload), fed `chunk_bytes`
    /// at a time, and returns how many requests were decided. The parser's property tests and
    /// the cargo-fuzz targets (`appliance/fuzz`) drive the codec with it: whatever the bytes, the
    /// codec must neither panic nor stop making progress (the one panic here says it did).
    pub fn run_conversation(config: ServerConfig, input: &[u8], chunk_bytes: usize) -> usize {
        let mut handshake = Handshake::new(config);
        let mut buffer: Vec<u8> = Vec::new();
        let mut fed = 0;
        let mut validator = None;
        let mut decided = 0;
        let mut discard: u64 = 0;
        // Every step feeds a chunk, consumes bytes or decides a request (the handshake's `Ready`
        // once), so a codec that makes progress needs at most about two steps per input byte.
        let steps_max = 4 * input.len() + 64;
        for _ in 0..steps_max {
            // Feed the next chunk when the codec needs more.
            let step = match validator {
                None => match handshake.handle_input(&buffer) {
                    Err(_) => return decided,
                    Ok((used, event)) => {
                        assert!(used <= buffer.len());
                        buffer.drain(..used);
                        match event {
                            HandshakeEvent::Ready(negotiated) => {
                                validator = Some(negotiated.validator());
                                true
                            }
                            HandshakeEvent::Aborted => return decided,
                            HandshakeEvent::Continue => true,
                            HandshakeEvent::NeedMore { .. } => false,
                        }
                    }
                },
                Some(validator) => {
                    if discard > 0 {
                        let dropped = discard.min(buffer.len() as u64) as usize;
                        buffer.drain(..dropped);
                        discard -= dropped as u64;
                        discard == 0
                    } else {
                        match decode_request(&buffer) {
                            Err(_) => return decided,
                            Ok(None) => false,
                            Ok(Some(request)) => {
                                buffer.drain(..REQUEST_HEADER_BYTES);
                                decided += 1;
                                match validator.decide(&request) {
                                    Action::Write { length, .. } => discard = u64::from(length),
                                    Action::Reject {
                                        discard_payload_bytes,
                                        ..
                                    } => discard = u64::from(discard_payload_bytes),
                                    Action::RejectAndClose { .. } | Action::Disconnect => {
                                        return decided
                                    }
                                    _ => {}
                                }
                                true
                            }
                        }
                    }
                }
            };
            if !step {
                if fed >= input.len() {
                    return decided;
                }
                let next = (fed + chunk_bytes.max(1)).min(input.len());
                buffer.extend_from_slice(&input[fed..next]);
                fed = next;
            }
        }
        panic!(
            "the codec stopped making progress: {steps_max} steps for {} input bytes",
            input.len()
        );
    }

    /// A client option: IHAVEOPT, option code, length, data.
    pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
        let header = OptionHeader {
            magic: IHAVEOPT_MAGIC.into(),
            option: option.into(),
            length: (data.len() as u32).into(),
        };
        let mut out = header.as_bytes().to_vec();
        out.extend_from_slice(data);
        out
    }

    /// `NBD_OPT_GO` / `NBD_OPT_INFO` data for `name` asking for `info_types`.
    pub fn encode_go_data(name: &str, info_types: &[u16]) -> Vec<u8> {
        let mut out = (name.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(info_types.len() as u16).to_be_bytes());
        for info in info_types {
            out.extend_from_slice(&info.to_be_bytes());
        }
        out
    }

    /// A transmission request header.
    pub fn encode_request(request: &Request) -> [u8; REQUEST_HEADER_BYTES] {
        let header = RequestHeader {
            magic: REQUEST_MAGIC.into(),
            flags: request.flags.into(),
            command: request.command.into(),
            cookie: request.cookie.into(),
            offset: request.offset.into(),
            length: request.length.into(),
        };
        let mut out = [0u8; REQUEST_HEADER_BYTES];
        out.copy_from_slice(header.as_bytes());
        out
    }

    /// One option reply decoded from the front of `input`: (option, reply type, data, used).
    pub fn decode_option_reply(input: &[u8]) -> Option<(u32, u32, &[u8], usize)> {
        let (header, rest) = OptionReplyHeader::read_from_prefix(input).ok()?;
        if header.magic.get() != OPTION_REPLY_MAGIC {
            return None;
        }
        let length = header.length.get() as usize;
        let data = rest.get(..length)?;
        Some((
            header.option.get(),
            header.reply_type.get(),
            data,
            OPTION_REPLY_HEADER_BYTES + length,
        ))
    }

    /// A simple reply header decoded from the front of `input`: (error, cookie).
    pub fn decode_simple_reply(input: &[u8]) -> Option<(u32, u64)> {
        let (header, _) = SimpleReplyHeader::read_from_prefix(input).ok()?;
        (header.magic.get() == SIMPLE_REPLY_MAGIC)
            .then(|| (header.error.get(), header.cookie.get()))
    }
}

#[cfg(test)]
mod tests {
    use super::client::*;
    use super::*;
    use proptest::prelude::*;

    const SIZE_BYTES: u64 = 1 << 20;

    fn config() -> ServerConfig {
        ServerConfig::new(vec![ExportInfo {
            name: "web-1/os".into(),
            size_bytes: SIZE_BYTES,
            description: "ferry capture of web-1/os".into(),
        }])
    }

    fn two_exports() -> ServerConfig {
        let mut config = config();
        config.exports.push(ExportInfo {
            name: "web-1/data".into(),
            size_bytes: 4096,
            description: String::new(),
        });
        config.default_export = None;
        config
    }

    /// Feeds `input` to a handshake until it needs more, finishes or fails; returns the events.
    fn drive(
        handshake: &mut Handshake,
        input: &[u8],
    ) -> (Vec<HandshakeEvent>, Result<(), HandshakeError>, usize) {
        let mut events = Vec::new();
        let mut position = 0;
        for _ in 0..10_000 {
            match handshake.handle_input(&input[position..]) {
                Ok((used, event)) => {
                    position += used;
                    let stop = !matches!(event, HandshakeEvent::Continue);
                    events.push(event);
                    if stop {
                        return (events, Ok(()), position);
                    }
                }
                Err(error) => return (events, Err(error), position),
            }
        }
        panic!("handshake did not stop within 10000 steps");
    }

    fn replies(mut output: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut all = Vec::new();
        while let Some((option, reply_type, data, used)) = decode_option_reply(output) {
            all.push((option, reply_type, data.to_vec()));
            output = &output[used..];
        }
        assert!(
            output.is_empty(),
            "trailing bytes after option replies: {output:?}"
        );
        all
    }

    #[test]
    fn greeting_is_fixed_newstyle_with_no_zeroes() {
        let mut handshake = Handshake::new(config());
        let greeting = handshake.take_output();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        assert_eq!(greeting[16..18], [0, 3]);
    }

    #[test]
    fn go_with_block_size_reaches_transmission() {
        let mut handshake = Handshake::new(config());
        handshake.take_output();
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(encode_option(
            OPT_GO,
            &encode_go_data("web-1/os", &[INFO_BLOCK_SIZE, INFO_NAME]),
        ));
        input.extend_from_slice(b"trailing request bytes");
        let (events, result, used) = drive(&mut handshake, &input);
        result.unwrap();
        let Some(HandshakeEvent::Ready(negotiated)) = events.last() else {
            panic!("{events:?}")
        };
        assert_eq!(used, input.len() - b"trailing request bytes".len());
        assert_eq!(negotiated.export_index, 0);
        assert!(negotiated.block_sizes_agreed);
        assert_eq!(negotiated.validator().alignment_bytes, 512);
        let all = replies(&handshake.take_output());
        let types: Vec<u32> = all.iter().map(|reply| reply.1).collect();
        assert_eq!(types, vec![REP_INFO, REP_INFO, REP_INFO, REP_ACK]);
        assert_eq!(&all[0].2[..2], &INFO_EXPORT.to_be_bytes());
        assert_eq!(&all[0].2[2..10], &SIZE_BYTES.to_be_bytes());
        assert_eq!(&all[2].2[2..], b"web-1/os");
        assert_eq!(handshake.handle_input(b"x"), Err(HandshakeError::Finished));
    }

    #[test]
    fn default_export_and_export_name_with_zeroes() {
        let mut handshake = Handshake::new(config());
        handshake.take_output();
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(encode_option(OPT_EXPORT_NAME, b""));
        let (events, result, _) = drive(&mut handshake, &input);
        result.unwrap();
        let Some(HandshakeEvent::Ready(negotiated)) = events.last() else {
            panic!("{events:?}")
        };
        assert!(!negotiated.block_sizes_agreed);
        assert_eq!(negotiated.validator().alignment_bytes, 1);
        let output = handshake.take_output();
        assert_eq!(output.len(), 8 + 2 + 124);
        assert_eq!(&output[..8], &SIZE_BYTES.to_be_bytes());
        assert_eq!(
            u16::from_be_bytes([output[8], output[9]]) & FLAG_HAS_FLAGS,
            FLAG_HAS_FLAGS
        );
    }

    #[test]
    fn list_unknown_option_info_and_abort() {
        let mut handshake = Handshake::new(two_exports());
        handshake.take_output();
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(encode_option(OPT_LIST, b""));
        input.extend(encode_option(OPT_LIST, b"x"));
        input.extend(encode_option(0x7777, b"whatever"));
        input.extend(encode_option(OPT_STRUCTURED_REPLY, b""));
        input.extend(encode_option(OPT_INFO, &encode_go_data("", &[])));
        input.extend(encode_option(OPT_INFO, &encode_go_data("web-1/data", &[])));
        input.extend(encode_option(OPT_GO, b"\0\0\0\x09web-1")); // name overruns the data
        input.extend(encode_option(OPT_ABORT, b""));
        let (events, result, used) = drive(&mut handshake, &input);
        result.unwrap();
        assert_eq!(used, input.len());
        assert_eq!(events.last(), Some(&HandshakeEvent::Aborted));
        let all = replies(&handshake.take_output());
        let summary: Vec<(u32, u32)> = all.iter().map(|reply| (reply.0, reply.1)).collect();
        assert_eq!(
            summary,
            vec![
                (OPT_LIST, REP_SERVER),
                (OPT_LIST, REP_SERVER),
                (OPT_LIST, REP_ACK),
                (OPT_LIST, REP_ERR_INVALID),
                (0x7777, REP_ERR_UNSUP),
                (OPT_STRUCTURED_REPLY, REP_ERR_UNSUP),
                (OPT_INFO, REP_ERR_UNKNOWN), // two exports: no default export
                (OPT_INFO, REP_INFO),
                (OPT_INFO, REP_INFO),
                (OPT_INFO, REP_ACK),
                (OPT_GO, REP_ERR_INVALID),
                (OPT_ABORT, REP_ACK),
            ]
        );
        assert_eq!(&all[0].2[4..], b"web-1/os");
        assert_eq!(&all[1].2[4..], b"web-1/data");
    }

    #[test]
    fn fatal_handshake_inputs() {
        let cases: Vec<(Vec<u8>, HandshakeError)> = vec![
            (
                4u32.to_be_bytes().to_vec(),
                HandshakeError::BadClientFlags { flags: 4 },
            ),
            (
                [1u32.to_be_bytes().to_vec(), vec![0xff; 16]].concat(),
                HandshakeError::BadOptionMagic { found: u64::MAX },
            ),
            (
                [
                    1u32.to_be_bytes().to_vec(),
                    encode_option(OPT_EXPORT_NAME, b"nope"),
                ]
                .concat(),
                HandshakeError::UnknownExport {
                    name: "nope".into(),
                },
            ),
            (
                [
                    1u32.to_be_bytes().to_vec(),
                    encode_option(OPT_LIST, &[0; 16])[..16].to_vec(),
                ]
                .concat()
                .into_iter()
                .enumerate()
                .map(|(index, byte)| if index == 16 { 0xff } else { byte })
                .collect(),
                HandshakeError::OptionTooLarge {
                    option: OPT_LIST,
                    length: 0xff00_0010,
                },
            ),
        ];
        for (input, expected) in cases {
            let mut handshake = Handshake::new(config());
            let (_, result, _) = drive(&mut handshake, &input);
            assert_eq!(result, Err(expected));
        }
    }

    #[test]
    fn handshake_waits_for_whole_messages() {
        let mut handshake = Handshake::new(config());
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(encode_option(OPT_GO, &encode_go_data("web-1/os", &[])));
        // Byte by byte: every prefix either needs more or makes progress.
        let mut buffer = Vec::new();
        let mut ready = false;
        for byte in input {
            buffer.push(byte);
            loop {
                let (used, event) = handshake.handle_input(&buffer).unwrap();
                buffer.drain(..used);
                match event {
                    HandshakeEvent::NeedMore { bytes_needed } => {
                        assert!(bytes_needed > buffer.len());
                        break;
                    }
                    HandshakeEvent::Ready(_) => {
                        ready = true;
                        break;
                    }
                    HandshakeEvent::Continue => {}
                    HandshakeEvent::Aborted => panic!("aborted"),
                }
            }
        }
        assert!(ready);
        assert!(buffer.is_empty());
    }

    #[test]
    fn too_many_options_closes() {
        let mut handshake = Handshake::new(config());
        let mut input = 1u32.to_be_bytes().to_vec();
        for _ in 0..=OPTIONS_PER_CONNECTION_MAX {
            input.extend(encode_option(OPT_LIST, b""));
        }
        let (_, result, _) = drive(&mut handshake, &input);
        assert_eq!(result, Err(HandshakeError::TooManyOptions));
    }

    fn validator() -> RequestValidator {
        RequestValidator {
            size_bytes: SIZE_BYTES,
            alignment_bytes: 512,
            payload_bytes_max: 64 * 1024,
            transmission_flags: ServerConfig::WRITABLE_FLAGS,
        }
    }

    fn request(command: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            cookie: 9,
            command,
            flags,
            offset,
            length,
        }
    }

    /// An accepted action, or a rejection's (error, payload bytes to discard).
    type Expected = Result<Action, (ErrorCode, u32)>;

    /// Data-driven: (request, expected action summary).
    #[test]
    fn request_validation_table() {
        let v = validator();
        let end = SIZE_BYTES;
        let ok = |action: Action| action;
        let rej = |error, discard| (error, discard);
        let cases: Vec<(Request, Expected)> = vec![
            (
                request(CMD_READ, 0, 0, 4096),
                Ok(ok(Action::Read {
                    cookie: 9,
                    offset: 0,
                    length: 4096,
                })),
            ),
            (
                request(CMD_WRITE, CMD_FLAG_FUA, end - 512, 512),
                Ok(Action::Write {
                    cookie: 9,
                    offset: end - 512,
                    length: 512,
                    fua: true,
                }),
            ),
            (
                request(CMD_WRITE, 0, end - 512, 1024),
                Err(rej(ErrorCode::NoSpc, 1024)),
            ),
            (
                request(CMD_READ, 0, end, 512),
                Err(rej(ErrorCode::Inval, 0)),
            ),
            (
                request(CMD_READ, 0, u64::MAX - 100, 512),
                Err(rej(ErrorCode::Inval, 0)),
            ),
            (
                request(CMD_WRITE, 0, 100, 512),
                Err(rej(ErrorCode::Inval, 512)),
            ),
            (
                request(CMD_WRITE, 0, 512, 100),
                Err(rej(ErrorCode::Inval, 100)),
            ),
            (request(CMD_WRITE, 0, 0, 0), Err(rej(ErrorCode::Inval, 0))),
            (
                request(CMD_READ, 0, 0, 128 * 1024),
                Err(rej(ErrorCode::Overflow, 0)),
            ),
            (
                request(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512),
                Err(rej(ErrorCode::Inval, 512)),
            ),
            (request(CMD_FLUSH, 0, 0, 0), Ok(Action::Flush { cookie: 9 })),
            (request(CMD_FLUSH, 0, 0, 1), Err(rej(ErrorCode::Inval, 0))),
            (
                request(CMD_TRIM, 0, 0, end as u32),
                Ok(Action::Trim {
                    cookie: 9,
                    offset: 0,
                    length: end as u32,
                    fua: false,
                }),
            ),
            (
                request(CMD_TRIM, CMD_FLAG_NO_HOLE, 0, 512),
                Err(rej(ErrorCode::Inval, 0)),
            ),
            (
                request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 512, 512),
                Ok(Action::WriteZeroes {
                    cookie: 9,
                    offset: 512,
                    length: 512,
                    fua: true,
                    no_hole: true,
                }),
            ),
            (
                request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 512, 512),
                Err(rej(ErrorCode::Inval, 0)),
            ),
            (
                request(CMD_WRITE_ZEROES, 0, end, 512),
                Err(rej(ErrorCode::Inval, 0)),
            ),
            (request(CMD_CACHE, 0, 0, 512), Err(rej(ErrorCode::Inval, 0))),
            (
                request(CMD_BLOCK_STATUS, 0, 0, 512),
                Err(rej(ErrorCode::Inval, 0)),
            ),
            (request(999, 0, 0, 512), Err(rej(ErrorCode::Inval, 0))),
            (request(CMD_DISC, 0, 0, 0), Ok(Action::Disconnect)),
        ];
        for (input, expected) in cases {
            let action = v.decide(&input);
            match (&action, expected) {
                (
                    Action::Reject {
                        error,
                        discard_payload_bytes,
                        cookie,
                        ..
                    },
                    Err((want_error, want_discard)),
                ) => {
                    assert_eq!(
                        (*error, *discard_payload_bytes, *cookie),
                        (want_error, want_discard, 9),
                        "{input:?}"
                    );
                }
                (_, Ok(want)) => assert_eq!(action, want, "{input:?}"),
                (_, Err(want)) => panic!("{input:?}: got {action:?}, want reject {want:?}"),
            }
        }
        let oversized_write = v.decide(&request(CMD_WRITE, 0, 0, 1 << 30));
        assert!(
            matches!(
                oversized_write,
                Action::RejectAndClose {
                    error: ErrorCode::Overflow,
                    ..
                }
            ),
            "{oversized_write:?}"
        );
    }

    #[test]
    fn request_round_trip_and_bad_magic() {
        let original = request(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        let bytes = encode_request(&original);
        assert_eq!(decode_request(&bytes[..27]), Ok(None));
        assert_eq!(decode_request(&bytes), Ok(Some(original)));
        let mut bad = bytes;
        bad[0] ^= 1;
        assert!(decode_request(&bad).is_err());
        let reply = encode_simple_reply(0xdead_beef, ErrorCode::NoSpc);
        assert_eq!(decode_simple_reply(&reply), Some((28, 0xdead_beef)));
    }

    /// A valid client conversation: flags, GO, then a mix of requests with payloads.
    fn valid_stream() -> Vec<u8> {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(encode_option(OPT_LIST, b""));
        input.extend(encode_option(
            OPT_GO,
            &encode_go_data("web-1/os", &[INFO_BLOCK_SIZE]),
        ));
        for (index, command) in [
            CMD_WRITE,
            CMD_READ,
            CMD_TRIM,
            CMD_WRITE_ZEROES,
            CMD_FLUSH,
            CMD_DISC,
        ]
        .iter()
        .enumerate()
        {
            let length = if *command == CMD_FLUSH || *command == CMD_DISC {
                0
            } else {
                1024
            };
            let offset = if length == 0 { 0 } else { 512 * index as u64 };
            input.extend(encode_request(&request(*command, 0, offset, length)));
            if *command == CMD_WRITE {
                input.extend(vec![0xab; length as usize]);
            }
        }
        input
    }

    /// Runs a whole connection's input through the codec the way the server does, with any
    /// chunking; returns how many requests were decided. Must never panic.
    fn run_connection(input: &[u8], chunk_bytes: usize) -> usize {
        run_conversation(config(), input, chunk_bytes)
    }

    #[test]
    fn valid_stream_decides_every_request() {
        for chunk in [1, 7, 28, 4096] {
            assert_eq!(run_connection(&valid_stream(), chunk), 6, "chunk {chunk}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random bytes, random chunking: the codec never panics and always terminates.
        #[test]
        fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..4096), chunk in 1usize..300) {
            run_connection(&input, chunk);
        }

        /// Random bytes after a valid handshake reach the request decoder and validator.
        #[test]
        fn random_requests_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..4096), chunk in 1usize..300) {
            let mut input = 1u32.to_be_bytes().to_vec();
            input.extend(encode_option(OPT_GO, &encode_go_data("", &[INFO_BLOCK_SIZE])));
            input.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            input.extend(tail);
            run_connection(&input, chunk);
        }

        /// A valid conversation with a few bytes flipped, inserted or removed.
        #[test]
        fn mutated_streams_never_panic(
            mutations in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..8),
            chunk in 1usize..300,
        ) {
            let mut input = valid_stream();
            for (position, byte, kind) in mutations {
                let index = position % (input.len() + 1);
                match kind {
                    0 if index < input.len() => input[index] ^= byte | 1,
                    1 => input.insert(index, byte),
                    _ if index < input.len() => { input.remove(index); }
                    _ => {}
                }
            }
            run_connection(&input, chunk);
        }

        /// Every request header decodes to exactly one decision, and accepted ranges are inside
        /// the export and aligned.
        #[test]
        fn decisions_respect_the_export(command in 0u16..10, flags in any::<u16>(), offset in any::<u64>(), length in any::<u32>()) {
            let v = validator();
            let input = request(command, flags, offset % (2 * SIZE_BYTES), length % (256 * 1024));
            match v.decide(&input) {
                Action::Read { offset, length, .. }
                | Action::Write { offset, length, .. }
                | Action::Trim { offset, length, .. }
                | Action::WriteZeroes { offset, length, .. } => {
                    prop_assert!(length > 0 && offset + u64::from(length) <= SIZE_BYTES);
                    prop_assert_eq!(offset % 512, 0);
                    prop_assert_eq!(length % 512, 0);
                }
                _ => {}
            }
        }
    }
}
