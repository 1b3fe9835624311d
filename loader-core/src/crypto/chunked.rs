//! C2SP chunked encryption, instantiated as **Cobblestone-256**
//! (HKDF-Expand SHA-512 + AES-256-GCM), per <https://c2sp.org/chunked-encryption>.
//!
//! ```text
//! key || base nonce || commitment = HKDF-Expand(prk = input key,
//!     info = "c2sp.org/chunked-encryption@v1+" || "AEAD_AES_256_GCM" || 0x00 || salt || context)
//! ciphertext = salt (24) || commitment (32) || AEAD(chunk 0) || ... || AEAD(final chunk)
//! ```
//!
//! Chunks hold 16 KiB of plaintext; the final chunk is always shorter (possibly empty).
//! Chunk `k` is sealed with nonce `base nonce XOR k` (big-endian) and empty AAD.
//!
//! Two decryption interfaces, both with the same guarantees:
//! - [`Payload`]: random access over a ciphertext in memory (an mmap'd shard);
//! - [`StreamDecryptor`]: streaming from any [`std::io::Read`].
//!
//! Neither ever returns a byte of a chunk that did not authenticate, and the commitment
//! is checked before any chunk is decrypted.

use std::io::{Read, Write};

use zeroize::{Zeroize, Zeroizing};

use super::aead::{AeadKey, Backend, KEY_LEN, NONCE_LEN, TAG_LEN};
use crate::error::{Error, IntegrityKind, Result};
use crate::memory::{LockedBuf, MemoryPolicy};

/// Plaintext bytes per chunk (16 KiB).
pub const CHUNK_LEN: usize = 16 * 1024;
/// Ciphertext bytes per full chunk (plaintext + tag).
pub const ENC_CHUNK_LEN: usize = CHUNK_LEN + TAG_LEN;
/// Salt length.
pub const SALT_LEN: usize = 24;
/// Key commitment length.
pub const COMMITMENT_LEN: usize = 32;
/// Bytes before the first chunk: salt || commitment.
pub const HEADER_LEN: usize = SALT_LEN + COMMITMENT_LEN;
/// The spec's hard limit on the chunk counter.
pub const MAX_CHUNKS: u64 = 1 << 38;

const INFO_PREFIX: &[u8] = b"c2sp.org/chunked-encryption@v1+AEAD_AES_256_GCM\x00";

/// One chunk of plaintext scratch: page-aligned anonymous memory that is `mlock`ed,
/// `MADV_DONTDUMP` and `MADV_WIPEONFORK` (a [`LockedBuf`]), zeroized on drop. It holds
/// the final chunk and the record-index chunks when a shard is opened, and partial
/// chunks of random-access reads.
pub struct ChunkBuf(LockedBuf);

impl ChunkBuf {
    /// A zeroed buffer, locked if the memory-lock limit allows (never dumped either
    /// way). For the fail-closed variant see [`ChunkBuf::with_policy`].
    pub fn new() -> Self {
        // Only the mapping itself can fail with AllowUnlocked: an allocation failure,
        // handled as the heap allocation this replaces would handle it.
        Self::with_policy(MemoryPolicy::AllowUnlocked)
            .unwrap_or_else(|_| std::alloc::handle_alloc_error(std::alloc::Layout::new::<[u8; CHUNK_LEN]>()))
    }

    /// A zeroed buffer; under [`MemoryPolicy::RequireLocked`] one that cannot be locked
    /// is an [`Error::MemoryLock`].
    pub fn with_policy(policy: MemoryPolicy) -> Result<Self> {
        LockedBuf::new(CHUNK_LEN, policy).map(Self)
    }

    /// Whether the pages are locked in RAM.
    pub fn is_locked(&self) -> bool {
        self.0.is_locked()
    }
}

impl Default for ChunkBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl std::ops::Deref for ChunkBuf {
    type Target = [u8; CHUNK_LEN];
    fn deref(&self) -> &Self::Target {
        self.0.as_slice().first_chunk().unwrap_or_else(|| unreachable!("a LockedBuf holds at least its length"))
    }
}

impl std::ops::DerefMut for ChunkBuf {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut_slice().first_chunk_mut().unwrap_or_else(|| unreachable!("a LockedBuf holds at least its length"))
    }
}

/// The per-message AEAD key and base nonce derived from the input key.
struct MessageKey {
    aead: Box<dyn AeadKey>,
    base_nonce: [u8; NONCE_LEN],
}

impl MessageKey {
    /// Nonce for chunk `k`: the base nonce XOR `k` as a 96-bit big-endian integer.
    fn nonce(&self, k: u64) -> [u8; NONCE_LEN] {
        let mut n = self.base_nonce;
        for (b, c) in n[NONCE_LEN - 8..].iter_mut().zip(k.to_be_bytes()) {
            *b ^= c;
        }
        n
    }
}

struct Len(usize);
impl aws_lc_rs::hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand(prk = input key, info) with SHA-512, split into (key, base nonce,
/// commitment), per the "Key derivation" section of the spec.
fn derive(backend: Backend, input_key: &[u8], salt: &[u8], context: &[u8]) -> Result<(MessageKey, [u8; 32])> {
    if input_key.len() != KEY_LEN {
        return Err(Error::InvalidArgument(format!(
            "Cobblestone-256 input key must be {KEY_LEN} bytes, got {}",
            input_key.len()
        )));
    }
    let prk = aws_lc_rs::hkdf::Prk::new_less_safe(aws_lc_rs::hkdf::HKDF_SHA512, input_key);
    let info: [&[u8]; 3] = [INFO_PREFIX, salt, context];
    let mut okm = Zeroizing::new([0u8; KEY_LEN + NONCE_LEN + COMMITMENT_LEN]);
    prk.expand(&info, Len(okm.len()))
        .and_then(|o| o.fill(&mut okm[..]))
        .map_err(|_| Error::Crypto("HKDF-Expand failed"))?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(&okm[..KEY_LEN]);
    let mut base_nonce = [0u8; NONCE_LEN];
    base_nonce.copy_from_slice(&okm[KEY_LEN..KEY_LEN + NONCE_LEN]);
    let mut commitment = [0u8; COMMITMENT_LEN];
    commitment.copy_from_slice(&okm[KEY_LEN + NONCE_LEN..]);
    Ok((MessageKey { aead: backend.key(&key), base_nonce }, commitment))
}

thread_local! {
    /// Each thread's private copy of the sealed chunk it is opening (ciphertext only:
    /// not secret, so not locked).
    static SEALED_COPY: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; ENC_CHUNK_LEN].into_boxed_slice());
}

/// Ciphertext length for a plaintext of `plaintext_len` bytes.
pub fn ciphertext_len(plaintext_len: u64) -> Option<u64> {
    let full = plaintext_len / CHUNK_LEN as u64;
    let last = plaintext_len % CHUNK_LEN as u64;
    full.checked_mul(ENC_CHUNK_LEN as u64)?.checked_add(HEADER_LEN as u64 + last + TAG_LEN as u64)
}

/// Splits a ciphertext length into (chunk count, plaintext length of the final chunk),
/// or fails if no message encrypts to that length.
fn layout(ct_len: usize) -> Result<(u64, usize)> {
    let body = ct_len.checked_sub(HEADER_LEN).ok_or_else(|| Error::integrity(IntegrityKind::Truncated, None))?;
    let full = (body / ENC_CHUNK_LEN) as u64;
    let rem = body % ENC_CHUNK_LEN;
    if rem < TAG_LEN {
        // Either cut inside a tag, or cut exactly at a chunk boundary, so the
        // mandatory short final chunk is missing.
        return Err(Error::integrity(IntegrityKind::Truncated, Some(full)));
    }
    let chunks = full + 1;
    if chunks > MAX_CHUNKS {
        return Err(Error::integrity(IntegrityKind::Truncated, None));
    }
    Ok((chunks, rem - TAG_LEN))
}

/// An opened Cobblestone-256 message without its bytes: the derived key and the chunk
/// layout implied by the ciphertext length. For ciphertexts whose chunks arrive one
/// range at a time (ranged reads from object storage); [`Payload`] wraps one with a
/// buffer.
pub struct Message {
    key: MessageKey,
    chunks: u64,
    last_len: usize,
}

impl Message {
    /// Checks the key commitment in `prefix` (the first [`HEADER_LEN`] bytes of the
    /// ciphertext: salt || commitment) for `input_key` and `context`, and that a
    /// ciphertext of `ct_len` bytes is a possible message. No chunk is decrypted.
    pub fn open(backend: Backend, input_key: &[u8], context: &[u8], prefix: &[u8], ct_len: u64) -> Result<Self> {
        if prefix.len() < HEADER_LEN || ct_len < HEADER_LEN as u64 {
            return Err(Error::integrity(IntegrityKind::Truncated, None));
        }
        let (salt, rest) = prefix.split_at(SALT_LEN);
        let (key, commitment) = derive(backend, input_key, salt, context)?;
        if !super::ct_eq(&commitment, &rest[..COMMITMENT_LEN]) {
            return Err(Error::integrity(IntegrityKind::Commitment, None));
        }
        let ct_len = usize::try_from(ct_len).map_err(|_| Error::integrity(IntegrityKind::Truncated, None))?;
        let (chunks, last_len) = layout(ct_len)?;
        Ok(Self { key, chunks, last_len })
    }

    /// Number of chunks (at least 1).
    pub fn chunk_count(&self) -> u64 {
        self.chunks
    }

    /// Plaintext length in bytes, as implied by the ciphertext length. It is
    /// authenticated only once the final chunk has been read.
    pub fn plaintext_len(&self) -> u64 {
        (self.chunks - 1) * CHUNK_LEN as u64 + self.last_len as u64
    }

    /// Plaintext length of chunk `k`.
    pub fn chunk_plaintext_len(&self, k: u64) -> usize {
        if k + 1 == self.chunks {
            self.last_len
        } else {
            CHUNK_LEN
        }
    }

    /// Byte range of chunk `k` (ciphertext and tag) within the ciphertext, counted from
    /// its first byte (the salt).
    pub fn chunk_range(&self, k: u64) -> std::ops::Range<u64> {
        let start = HEADER_LEN as u64 + k * ENC_CHUNK_LEN as u64;
        start..start + (self.chunk_plaintext_len(k) + TAG_LEN) as u64
    }

    /// Decrypts and authenticates chunk `k`, whose ciphertext and tag are `sealed`
    /// (exactly [`Message::chunk_range`] long), into `out[..chunk_plaintext_len(k)]`
    /// and returns that length. On failure nothing in `out` is left from this chunk.
    pub fn open_chunk(&self, k: u64, sealed: &[u8], out: &mut [u8]) -> Result<usize> {
        if k >= self.chunks {
            return Err(Error::InvalidArgument(format!("chunk {k} out of range (payload has {})", self.chunks)));
        }
        let n = self.chunk_plaintext_len(k);
        if out.len() < n {
            return Err(Error::InvalidArgument(format!("output buffer of {} bytes < chunk of {n}", out.len())));
        }
        if sealed.len() != n + TAG_LEN {
            return Err(Error::integrity(IntegrityKind::Truncated, Some(k)));
        }
        let (ct, tag) = sealed.split_at(n);
        self.key
            .aead
            .open_to(&self.key.nonce(k), &[], ct, tag, &mut out[..n])
            .map_err(|_| Error::integrity(IntegrityKind::ChunkAuth, Some(k)))?;
        Ok(n)
    }

    /// Decrypts plaintext bytes `[offset, offset + out.len())` into `out`, decrypting
    /// only the chunks that cover the range, each through `chunk(k, out)` (which
    /// decrypts chunk `k` into `out`, e.g. with [`Message::open_chunk`]). `scratch`
    /// must hold one chunk; it is used for partially covered chunks and zeroized after
    /// use. On failure `out` is zeroized.
    pub fn read_with(
        &self,
        offset: u64,
        out: &mut [u8],
        scratch: &mut [u8; CHUNK_LEN],
        mut chunk: impl FnMut(u64, &mut [u8]) -> Result<usize>,
    ) -> Result<()> {
        let end = offset.checked_add(out.len() as u64).filter(|&e| e <= self.plaintext_len()).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "range {offset}+{} beyond plaintext of {} bytes",
                out.len(),
                self.plaintext_len()
            ))
        })?;
        let mut pos = offset;
        let mut written = 0usize;
        let result = (|| {
            while pos < end {
                let k = pos / CHUNK_LEN as u64;
                let within = (pos % CHUNK_LEN as u64) as usize;
                let n = self.chunk_plaintext_len(k);
                let take = ((end - pos) as usize).min(n - within);
                if within == 0 && take == n {
                    // Whole chunk: decrypt straight into the destination.
                    chunk(k, &mut out[written..written + n])?;
                } else {
                    chunk(k, &mut scratch[..])?;
                    out[written..written + take].copy_from_slice(&scratch[within..within + take]);
                }
                written += take;
                pos += take as u64;
            }
            // A read that reaches the end of the message authenticates its length, as
            // a read of the final byte does. An empty final chunk covers no byte of the
            // range, so without this a message cut at a chunk boundary (plus 16 bytes
            // of garbage) would read back whole (Wycheproof Cobblestone tcId 14).
            if end == self.plaintext_len() && self.last_len == 0 {
                chunk(self.chunks - 1, &mut scratch[..])?;
            }
            Ok(())
        })();
        scratch.zeroize();
        if result.is_err() {
            out.zeroize();
        }
        result
    }
}

/// An opened Cobblestone-256 ciphertext held in memory, for random-access decryption.
///
/// [`Payload::open`] checks the length and the key commitment; chunks are then
/// authenticated one by one as they are read.
///
/// `B` holds the bytes (a slice, a `Vec`, an mmap); the ciphertext starts at byte
/// `start` of it and runs to its end.
pub struct Payload<B> {
    msg: Message,
    buf: B,
    /// Offset of chunk 0 in `buf`.
    body: usize,
}

impl<B: AsRef<[u8]>> Payload<B> {
    /// Checks the ciphertext length and the key commitment of the ciphertext
    /// `buf[start..]` for `input_key` and `context`. No chunk is decrypted.
    pub fn open(backend: Backend, input_key: &[u8], context: &[u8], buf: B, start: usize) -> Result<Self> {
        let ciphertext = buf.as_ref().get(start..).unwrap_or_default();
        let msg = Message::open(backend, input_key, context, ciphertext, ciphertext.len() as u64)?;
        Ok(Self { msg, buf, body: start + HEADER_LEN })
    }

    /// Raw mode (spec appendix): `aead_key` and `base_nonce` given directly and no
    /// salt/commitment prefix. Test hook for the Wycheproof raw-mode vectors.
    #[doc(hidden)]
    pub fn open_raw(backend: Backend, aead_key: &[u8; KEY_LEN], base_nonce: [u8; NONCE_LEN], buf: B) -> Result<Self> {
        let (chunks, last_len) = layout(buf.as_ref().len() + HEADER_LEN)?;
        let msg = Message { key: MessageKey { aead: backend.key(aead_key), base_nonce }, chunks, last_len };
        Ok(Self { msg, buf, body: 0 })
    }

    /// The whole buffer given to [`Payload::open`].
    pub fn buffer(&self) -> &[u8] {
        self.buf.as_ref()
    }

    /// The key and chunk layout.
    pub fn message(&self) -> &Message {
        &self.msg
    }

    /// Number of chunks (at least 1).
    pub fn chunk_count(&self) -> u64 {
        self.msg.chunk_count()
    }

    /// Plaintext length in bytes, as implied by the ciphertext length. It is
    /// authenticated only once the final chunk has been read
    /// ([`Payload::authenticate_length`]).
    pub fn plaintext_len(&self) -> u64 {
        self.msg.plaintext_len()
    }

    /// Plaintext length of chunk `k`.
    pub fn chunk_plaintext_len(&self, k: u64) -> usize {
        self.msg.chunk_plaintext_len(k)
    }

    /// Decrypts and authenticates chunk `k` into `out[..chunk_plaintext_len(k)]` and
    /// returns that length. On failure nothing in `out` is left from this chunk.
    pub fn decrypt_chunk(&self, k: u64, out: &mut [u8]) -> Result<usize> {
        if k >= self.msg.chunks {
            return Err(Error::InvalidArgument(format!("chunk {k} out of range (payload has {})", self.msg.chunks)));
        }
        let r = self.msg.chunk_range(k);
        let at = self.body + (r.start as usize - HEADER_LEN);
        let sealed = &self.buf.as_ref()[at..at + (r.end - r.start) as usize];
        // AES-GCM reads its input twice (GHASH, then CTR). The buffer may be a shared
        // file mapping that another process can write between the two passes, which
        // would release plaintext that was never authenticated: open from a private
        // copy read once. (Out of place from the copy: opening in place is half as
        // fast with aws-lc.)
        SEALED_COPY.with(|copy| match copy.try_borrow_mut() {
            Ok(mut copy) => {
                copy[..sealed.len()].copy_from_slice(sealed);
                self.msg.open_chunk(k, &copy[..sealed.len()], out)
            }
            Err(_) => {
                // Re-entered on this thread (not done today): a copy of its own.
                let private = sealed.to_vec();
                self.msg.open_chunk(k, &private, out)
            }
        })
    }

    /// Authenticates the message length by decrypting the final chunk (spec,
    /// "Implementation notes") into a scratch chunk of its own.
    pub fn authenticate_length(&self) -> Result<()> {
        self.authenticate_length_with(&mut ChunkBuf::new())
    }

    /// As [`Payload::authenticate_length`], decrypting into `scratch` (zeroized after).
    pub fn authenticate_length_with(&self, scratch: &mut [u8; CHUNK_LEN]) -> Result<()> {
        let r = self.decrypt_chunk(self.msg.chunks - 1, &mut scratch[..]).map(|_| ());
        scratch.zeroize();
        r
    }

    /// Decrypts plaintext bytes `[offset, offset + out.len())` into `out`, decrypting
    /// only the chunks that cover the range. `scratch` must hold one chunk; it is
    /// used for partially covered chunks and zeroized after use.
    pub fn read_at(&self, offset: u64, out: &mut [u8], scratch: &mut [u8; CHUNK_LEN]) -> Result<()> {
        self.msg.read_with(offset, out, scratch, |k, o| self.decrypt_chunk(k, o))
    }
}

/// Streaming Cobblestone-256 decryption from a reader.
///
/// Yields authenticated chunks in order. After the first error every later call
/// returns the same error: a failed stream never ends cleanly.
pub struct StreamDecryptor<R> {
    reader: R,
    key: MessageKey,
    next: u64,
    buf: Box<[u8; ENC_CHUNK_LEN]>,
    state: StreamState,
}

#[derive(Clone, Copy)]
enum StreamState {
    Open,
    Done,
    Failed(IntegrityKind, Option<u64>),
}

impl<R: Read> StreamDecryptor<R> {
    /// Reads and checks the salt and commitment.
    pub fn new(backend: Backend, input_key: &[u8], context: &[u8], mut reader: R) -> Result<Self> {
        let mut header = [0u8; HEADER_LEN];
        let got = read_full(&mut reader, &mut header)?;
        if got < HEADER_LEN {
            return Err(Error::integrity(IntegrityKind::Truncated, None));
        }
        let (key, commitment) = derive(backend, input_key, &header[..SALT_LEN], context)?;
        if !super::ct_eq(&commitment, &header[SALT_LEN..]) {
            return Err(Error::integrity(IntegrityKind::Commitment, None));
        }
        Ok(Self { reader, key, next: 0, buf: Box::new([0u8; ENC_CHUNK_LEN]), state: StreamState::Open })
    }

    /// Decrypts the next chunk into `out` and returns its length, or `None` after the
    /// final chunk has been returned.
    pub fn next_chunk(&mut self, out: &mut [u8; CHUNK_LEN]) -> Result<Option<usize>> {
        match self.state {
            StreamState::Done => return Ok(None),
            StreamState::Failed(kind, chunk) => return Err(Error::integrity(kind, chunk)),
            StreamState::Open => {}
        }
        let r = self.step(out);
        if let Err(Error::Integrity { kind, chunk, .. }) = &r {
            self.state = StreamState::Failed(*kind, *chunk);
        }
        r
    }

    fn step(&mut self, out: &mut [u8; CHUNK_LEN]) -> Result<Option<usize>> {
        let k = self.next;
        if k >= MAX_CHUNKS {
            return Err(Error::integrity(IntegrityKind::TrailingData, Some(k)));
        }
        let got = read_full(&mut self.reader, &mut self.buf[..])?;
        // A full-size read cannot be the final chunk, which is always short.
        let last = got < ENC_CHUNK_LEN;
        if got < TAG_LEN {
            return Err(Error::integrity(IntegrityKind::Truncated, Some(k)));
        }
        let n = got - TAG_LEN;
        self.key
            .aead
            .open_to(&self.key.nonce(k), &[], &self.buf[..n], &self.buf[n..got], &mut out[..n])
            .map_err(|_| Error::integrity(IntegrityKind::ChunkAuth, Some(k)))?;
        self.next += 1;
        if last {
            self.state = StreamState::Done;
        }
        Ok(Some(n))
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io_at("read", "<stream>", e)),
        }
    }
    Ok(got)
}

/// Streaming Cobblestone-256 encryption into a writer.
///
/// Buffers at most one chunk; [`Encryptor::finish`] writes the mandatory short final
/// chunk (empty if the plaintext length is a multiple of 16 KiB).
pub struct Encryptor<W: Write> {
    writer: W,
    key: MessageKey,
    next: u64,
    buf: Zeroizing<Vec<u8>>,
    written: u64,
}

impl<W: Write> Encryptor<W> {
    /// Starts a message with a fresh random salt and writes salt || commitment.
    pub fn new(backend: Backend, input_key: &[u8], context: &[u8], writer: W) -> Result<Self> {
        let mut salt = [0u8; SALT_LEN];
        super::random_bytes(&mut salt)?;
        Self::with_salt(backend, input_key, context, salt, writer)
    }

    /// As [`Encryptor::new`] with a caller-chosen salt. The salt must never repeat for
    /// an input key; this exists for known-answer tests.
    #[doc(hidden)]
    pub fn with_salt(
        backend: Backend,
        input_key: &[u8],
        context: &[u8],
        salt: [u8; SALT_LEN],
        mut writer: W,
    ) -> Result<Self> {
        let (key, commitment) = derive(backend, input_key, &salt, context)?;
        let mut written = 0;
        write_all(&mut writer, &salt, &mut written)?;
        write_all(&mut writer, &commitment, &mut written)?;
        let mut buf = Zeroizing::new(Vec::with_capacity(ENC_CHUNK_LEN));
        buf.clear();
        Ok(Self { writer, key, next: 0, buf, written })
    }

    /// Encrypts `data`, writing every chunk that fills up.
    pub fn write(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let take = (CHUNK_LEN - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK_LEN {
                self.seal_buffered()?;
            }
        }
        Ok(())
    }

    fn seal_buffered(&mut self) -> Result<()> {
        if self.next >= MAX_CHUNKS {
            return Err(Error::InvalidArgument("message exceeds 2^38 chunks".into()));
        }
        let tag = self
            .key
            .aead
            .seal_in_place(&self.key.nonce(self.next), &[], &mut self.buf[..])
            .map_err(|_| Error::Crypto("AES-GCM seal failed"))?;
        write_all(&mut self.writer, &self.buf, &mut self.written)?;
        write_all(&mut self.writer, &tag, &mut self.written)?;
        self.buf.clear();
        self.next += 1;
        Ok(())
    }

    /// Writes the final (short, possibly empty) chunk and returns the writer and the
    /// number of ciphertext bytes written.
    pub fn finish(mut self) -> Result<(W, u64)> {
        self.seal_buffered()?;
        Ok((self.writer, self.written))
    }
}

fn write_all(w: &mut impl Write, data: &[u8], counter: &mut u64) -> Result<()> {
    w.write_all(data).map_err(Error::io("write", "<ciphertext>"))?;
    *counter += data.len() as u64;
    Ok(())
}

/// Encrypts a whole plaintext in memory (convenience for small messages and tests).
pub fn encrypt(backend: Backend, input_key: &[u8], context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let mut enc = Encryptor::new(
        backend,
        input_key,
        context,
        Vec::with_capacity(ciphertext_len(plaintext.len() as u64).unwrap_or(0) as usize),
    )?;
    enc.write(plaintext)?;
    Ok(enc.finish()?.0)
}

/// Decrypts a whole ciphertext in memory (convenience for small messages and tests).
/// Returns nothing unless every chunk authenticates.
pub fn decrypt(backend: Backend, input_key: &[u8], context: &[u8], ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let p = Payload::open(backend, input_key, context, ciphertext, 0)?;
    let mut out = Zeroizing::new(vec![0u8; p.plaintext_len() as usize]);
    let mut pos = 0;
    for k in 0..p.chunk_count() {
        pos += p.decrypt_chunk(k, &mut out[pos..])?;
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lengths_at_chunk_edges_roundtrip() {
        let key = [7u8; 32];
        for len in [0usize, 1, CHUNK_LEN - 1, CHUNK_LEN, CHUNK_LEN + 1, 3 * CHUNK_LEN] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            for &b in Backend::ALL {
                let ct = encrypt(b, &key, b"ctx", &pt).unwrap();
                assert_eq!(Some(ct.len() as u64), ciphertext_len(len as u64));
                assert_eq!(&decrypt(b, &key, b"ctx", &ct).unwrap()[..], &pt[..]);
                assert_eq!(
                    decrypt(b, &key, b"other", &ct).unwrap_err().integrity_kind(),
                    Some(IntegrityKind::Commitment)
                );
            }
        }
    }

    #[test]
    fn read_at_spans_chunks_and_zeroizes_on_failure() {
        let key = [9u8; 32];
        let pt: Vec<u8> = (0..3 * CHUNK_LEN + 100).map(|i| (i % 253) as u8).collect();
        let mut ct = encrypt(Backend::default(), &key, b"", &pt).unwrap();
        let p = Payload::open(Backend::default(), &key, b"", &ct[..], 0).unwrap();
        let mut scratch = [0u8; CHUNK_LEN];
        let mut out = vec![0u8; CHUNK_LEN + 10];
        p.read_at(CHUNK_LEN as u64 - 5, &mut out, &mut scratch).unwrap();
        assert_eq!(&out[..], &pt[CHUNK_LEN - 5..2 * CHUNK_LEN + 5]);
        // Corrupt chunk 1: a read covering it fails and leaves nothing behind.
        ct[HEADER_LEN + ENC_CHUNK_LEN + 3] ^= 1;
        let p = Payload::open(Backend::default(), &key, b"", &ct[..], 0).unwrap();
        let mut out = vec![0u8; 2 * CHUNK_LEN];
        let e = p.read_at(0, &mut out, &mut scratch).unwrap_err();
        assert!(matches!(e, Error::Integrity { chunk: Some(1), kind: IntegrityKind::ChunkAuth, .. }));
        assert!(out.iter().all(|&b| b == 0));
    }

    /// Security review finding 5: the scratch that holds a shard's final chunk and its
    /// index chunks (record bytes too) is locked and never dumped, not heap memory.
    #[test]
    fn chunk_scratch_is_locked_and_never_dumped() {
        let buf = ChunkBuf::with_policy(MemoryPolicy::RequireLocked).unwrap_or_else(|e| {
            panic!("{e}: this test needs a few locked pages; raise the limit (ulimit -l) to run it")
        });
        let m = crate::memory::smaps_entry(buf.as_ptr() as usize).unwrap();
        assert!(m.dont_dump(), "chunk scratch is not MADV_DONTDUMP: {m:?}");
        crate::memory::assert_locked(&m, buf.is_locked());
        // The best-effort constructor (used by `verify` and the test hooks) too.
        let buf = ChunkBuf::new();
        let m = crate::memory::smaps_entry(buf.as_ptr() as usize).unwrap();
        assert!(m.dont_dump(), "chunk scratch is not MADV_DONTDUMP: {m:?}");
        crate::memory::assert_locked(&m, buf.is_locked());
    }

    /// Security review finding 4: aws-lc's GCM reads its input twice, so a chunk opened
    /// straight from a shared mapping could change between GHASH and CTR. Every chunk
    /// of a mapped payload (decrypt_chunk, read_at, authenticate_length) is opened from
    /// a private copy: the AEAD never sees an address inside the caller's buffer.
    #[test]
    fn mapped_chunks_are_opened_from_a_private_copy() {
        let key = [5u8; 32];
        let pt: Vec<u8> = (0..2 * CHUNK_LEN + 77).map(|i| (i % 241) as u8).collect();
        let ct = encrypt(Backend::AwsLcRs, &key, b"c", &pt).unwrap();
        let p = Payload::open(Backend::AwsLcRs, &key, b"c", &ct[..], 0).unwrap();
        let inside = |a: usize| (ct.as_ptr() as usize..ct.as_ptr() as usize + ct.len()).contains(&a);
        let mut out = ChunkBuf::new();
        for k in 0..p.chunk_count() {
            crate::crypto::aead::LAST_OPENED.with(|c| c.set(0));
            let n = p.decrypt_chunk(k, &mut out[..]).unwrap();
            assert_eq!(&out[..n], &pt[k as usize * CHUNK_LEN..][..n]);
            let a = crate::crypto::aead::LAST_OPENED.with(|c| c.get());
            assert!(a != 0 && !inside(a), "chunk {k} was opened from the shared buffer itself");
        }
        let mut whole = vec![0u8; pt.len()];
        p.read_at(0, &mut whole, &mut [0u8; CHUNK_LEN]).unwrap();
        assert_eq!(whole, pt);
        assert!(!inside(crate::crypto::aead::LAST_OPENED.with(|c| c.get())));
    }
}
