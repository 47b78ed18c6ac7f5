//! The caps on what a checkpoint may make the reader hold or do.

/// The most `data.pkl` may hold.
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// The most the members of an archive may hold once uncompressed, whatever the archive's size.
pub const MAX_TOTAL_BYTES: u64 = 128 << 30;
/// The most the members may hold uncompressed, as a multiple of the archive's size (above 1 MiB).
/// `torch.save` stores its members uncompressed, so a real checkpoint is near 1.
pub const MAX_COMPRESSION_RATIO: u64 = 32;
/// The most members an archive may have.
pub const MAX_MEMBERS: usize = 1 << 20;

/// Pickle operations run before the pickle is refused as too large.
pub(super) const MAX_OPS: u64 = 8 << 20;
/// Objects visited while flattening the unpickled object.
pub(super) const MAX_NODES: u64 = 8 << 20;
/// Nesting of dicts and lists in the unpickled object.
pub(super) const MAX_DEPTH: usize = 64;
/// Dimensions of one tensor.
pub(super) const MAX_DIMS: usize = 32;
/// The first bytes of a zip archive.
pub(super) const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";
/// `torch.save`'s legacy magic number, `0x1950a86a20f9469cfc6c`, as the little-endian payload of
/// the `LONG1` opcode that opens a legacy file.
pub(super) const LEGACY_MAGIC: &[u8] =
    &[0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
