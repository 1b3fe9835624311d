#![allow(clippy::unwrap_used)]
//! Wycheproof test vectors, run through every AEAD backend compiled in
//! ([`Backend::ALL`]):
//!
//! - `c2sp_chunked_encryption_aes_256_gcm_test.json`: Cobblestone-256, through random
//!   access ([`Payload`]), streaming ([`StreamDecryptor`]), raw mode
//!   ([`Payload::open_raw`]) and encryption with an injected salt
//!   ([`Encryptor::with_salt`]), as described in `c2sp_chunked_encryption.md`;
//! - `aes_gcm_test.json`: the AES-256 / 96-bit IV / 128-bit tag groups, through
//!   [`Backend::key`];
//! - `aes_kwp_test.json`: through [`kwp::wrap`] / [`kwp::unwrap`];
//! - `ed25519_test.json`: through [`sign::verify`].
//!
//! Every file's tests are counted against its `numberOfTests`, and the tests that
//! apply are counted against a pinned number, so a silently skipped vector fails.
//!
//! The vector directory is `$SHARDLOCK_VECTORS` if set, else
//! `loader-core/tests/vectors/wycheproof` (vendored, with its LICENSE). A missing directory is a
//! failure, not a skip.

use std::io::Read;
use std::path::PathBuf;

use serde_json::Value;
use shardlock::primitives::aead::{Backend, KEY_LEN, NONCE_LEN, TAG_LEN};
use shardlock::primitives::chunked::{
    self, ChunkBuf, Encryptor, Payload, StreamDecryptor, CHUNK_LEN, HEADER_LEN, SALT_LEN,
};
use shardlock::primitives::{kwp, sign};

// ----------------------------------------------------------------------------------
// Loading

fn vectors_dir() -> PathBuf {
    let dir = match std::env::var_os("SHARDLOCK_VECTORS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/wycheproof")),
    };
    assert!(
        dir.is_dir(),
        "Wycheproof vector directory {} not found: set SHARDLOCK_VECTORS to the directory holding \
         the Wycheproof JSON files (these tests never skip silently)",
        dir.display()
    );
    dir
}

fn load(name: &str) -> Value {
    let path = vectors_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()))
}

fn groups(file: &Value) -> &[Value] {
    file["testGroups"].as_array().unwrap()
}

fn tests(group: &Value) -> &[Value] {
    group["tests"].as_array().unwrap()
}

fn number_of_tests(file: &Value) -> usize {
    file["numberOfTests"].as_u64().unwrap() as usize
}

fn str_field<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or_else(|| panic!("missing string field {field:?} in {v}"))
}

fn hex_field(v: &Value, field: &str) -> Vec<u8> {
    hex::decode(str_field(v, field)).unwrap()
}

fn opt_hex_field(v: &Value, field: &str) -> Option<Vec<u8>> {
    v.get(field).map(|_| hex_field(v, field))
}

fn tc_id(t: &Value) -> u64 {
    t["tcId"].as_u64().unwrap()
}

fn is_valid(t: &Value) -> bool {
    match str_field(t, "result") {
        "valid" => true,
        "invalid" => false,
        // None of the files used here has "acceptable" vectors; fail loudly if one appears.
        other => panic!("tcId {}: unexpected result {other:?}", tc_id(t)),
    }
}

fn has_flag(t: &Value, flag: &str) -> bool {
    t["flags"].as_array().unwrap().iter().any(|f| f.as_str() == Some(flag))
}

fn sha512(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA512, data).as_ref().to_vec()
}

// ----------------------------------------------------------------------------------
// C2SP chunked encryption (Cobblestone-256)

/// One decoded chunked-encryption vector.
struct Chunked {
    id: u64,
    key: Vec<u8>,
    ctx: Vec<u8>,
    ct: Vec<u8>,
    aead_key: Option<[u8; KEY_LEN]>,
    base_nonce: Option<[u8; NONCE_LEN]>,
    /// For valid vectors the message; for `PartialPlaintext` ones the longest valid prefix.
    msg_len: Option<usize>,
    msg_sha512: Option<Vec<u8>>,
    valid: bool,
    header_failure: bool,
    invalid_key_size: bool,
    valid_final_chunk: bool,
    partial_plaintext: bool,
}

impl Chunked {
    fn parse(t: &Value) -> Self {
        let mut ct = Vec::new();
        flate2::read::ZlibDecoder::new(&hex_field(t, "ct")[..]).read_to_end(&mut ct).unwrap();
        let c = Chunked {
            id: tc_id(t),
            key: hex_field(t, "key"),
            ctx: hex_field(t, "ctx"),
            ct,
            aead_key: opt_hex_field(t, "aeadKey").map(|k| k.try_into().unwrap()),
            base_nonce: opt_hex_field(t, "baseNonce").map(|n| n.try_into().unwrap()),
            msg_len: t.get("msgLength").map(|n| n.as_u64().unwrap() as usize),
            msg_sha512: opt_hex_field(t, "msgSha512"),
            valid: is_valid(t),
            header_failure: has_flag(t, "HeaderFailure"),
            invalid_key_size: has_flag(t, "InvalidKeySize"),
            valid_final_chunk: has_flag(t, "ValidFinalChunk"),
            partial_plaintext: has_flag(t, "PartialPlaintext"),
        };
        if c.valid || c.partial_plaintext {
            assert!(c.msg_len.is_some() && c.msg_sha512.is_some(), "tcId {}: msgLength/msgSha512 missing", c.id);
        }
        assert_eq!(c.header_failure, c.aead_key.is_none(), "tcId {}: aeadKey present iff no HeaderFailure", c.id);
        c
    }

    /// The most plaintext any decryption may release before failing: the message for
    /// valid vectors, the valid prefix for `PartialPlaintext` ones, nothing otherwise.
    fn releasable(&self) -> usize {
        if self.valid || self.partial_plaintext {
            self.msg_len.unwrap()
        } else {
            0
        }
    }

    /// Checks that `produced` (plaintext released in order before an error or the end)
    /// is allowed: at most [`Chunked::releasable`] bytes, and the described message or
    /// prefix when it has exactly that length.
    fn check_released(&self, b: Backend, what: &str, produced: &[u8]) {
        let limit = self.releasable();
        assert!(
            produced.len() <= limit,
            "tcId {} [{}] {what}: released {} plaintext bytes, at most {limit} allowed",
            self.id,
            b.name(),
            produced.len()
        );
        if limit > 0 && produced.len() == limit {
            assert_eq!(
                sha512(produced),
                self.msg_sha512.clone().unwrap(),
                "tcId {} [{}] {what}: released plaintext has the wrong SHA-512",
                self.id,
                b.name()
            );
        }
    }

    fn check_message(&self, b: Backend, what: &str, msg: &[u8]) {
        assert_eq!(Some(msg.len()), self.msg_len, "tcId {} [{}] {what}: message length", self.id, b.name());
        self.check_released(b, what, msg);
    }
}

/// Decrypts every chunk of an opened payload in order. Returns the plaintext released
/// before the first failing chunk, and whether all chunks authenticated.
fn decrypt_all<B: AsRef<[u8]>>(p: &Payload<B>) -> (Vec<u8>, bool) {
    let mut out = vec![0u8; usize::try_from(p.plaintext_len()).unwrap()];
    let mut pos = 0;
    for k in 0..p.chunk_count() {
        assert_eq!(pos, k as usize * CHUNK_LEN);
        match p.decrypt_chunk(k, &mut out[pos..]) {
            Ok(n) => {
                assert_eq!(n, p.chunk_plaintext_len(k));
                pos += n;
            }
            Err(_) => {
                // Nothing of a failing chunk may be left behind in the (zeroed) output.
                assert!(out[pos..].iter().all(|&x| x == 0), "failed chunk {k} left plaintext behind");
                out.truncate(pos);
                return (out, false);
            }
        }
    }
    assert_eq!(pos, out.len());
    (out, true)
}

/// Random access: `Payload::open` + `authenticate_length` + every chunk, and
/// `read_at` of the whole message. Returns the message of a valid vector.
fn chunked_random_access(b: Backend, v: &Chunked) -> Option<Vec<u8>> {
    let id = v.id;
    let p = match Payload::open(b, &v.key, &v.ctx, &v.ct[..], 0) {
        Ok(p) => p,
        Err(e) => {
            assert!(!v.valid, "tcId {id} [{}] random access: open failed on a valid vector: {e}", b.name());
            return None;
        }
    };
    assert!(!v.valid || p.plaintext_len() == v.msg_len.unwrap() as u64);
    assert!(!v.header_failure, "tcId {id} [{}]: HeaderFailure vector accepted by Payload::open", b.name());
    assert!(!v.invalid_key_size, "tcId {id} [{}]: InvalidKeySize vector accepted by Payload::open", b.name());

    let auth = p.authenticate_length();
    if v.valid {
        auth.unwrap_or_else(|e| panic!("tcId {id} [{}]: authenticate_length failed: {e}", b.name()));
    } else if !v.valid_final_chunk {
        assert!(auth.is_err(), "tcId {id} [{}]: authenticate_length succeeded on an invalid vector", b.name());
    }

    let (produced, ok) = decrypt_all(&p);
    v.check_released(b, "random access", &produced);

    // Whole-message read_at: all or nothing.
    let mut whole = vec![0u8; usize::try_from(p.plaintext_len()).unwrap()];
    let mut scratch = ChunkBuf::new();
    let read = p.read_at(0, &mut whole, &mut scratch);
    assert_eq!(read.is_ok(), ok, "tcId {id} [{}]: read_at and decrypt_chunk disagree", b.name());

    if v.valid {
        assert!(ok, "tcId {id} [{}] random access: a chunk of a valid vector failed", b.name());
        v.check_message(b, "random access", &produced);
        assert_eq!(whole, produced, "tcId {id} [{}]: read_at differs from decrypt_chunk", b.name());
        Some(produced)
    } else {
        assert!(!ok, "tcId {id} [{}] random access: every chunk of an invalid vector authenticated", b.name());
        assert!(whole.iter().all(|&x| x == 0), "tcId {id} [{}]: failed read_at left plaintext behind", b.name());
        None
    }
}

/// A reader returning at most `step` bytes per call, to exercise short reads.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.step).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Streaming: `StreamDecryptor::new` + `next_chunk` until the end or an error.
fn chunked_streaming(b: Backend, v: &Chunked, reader: impl Read, what: &str) {
    let id = v.id;
    let mut s = match StreamDecryptor::new(b, &v.key, &v.ctx, reader) {
        Ok(s) => s,
        Err(e) => {
            assert!(!v.valid, "tcId {id} [{}] {what}: header rejected on a valid vector: {e}", b.name());
            assert_eq!(v.releasable(), 0, "tcId {id} [{}] {what}: header rejected, prefix expected", b.name());
            return;
        }
    };
    assert!(!v.header_failure, "tcId {id} [{}] {what}: HeaderFailure vector passed the header", b.name());

    let mut produced = Vec::new();
    let mut buf = ChunkBuf::new();
    let max_calls = v.ct.len() / CHUNK_LEN + 3;
    let mut outcome = None;
    for _ in 0..max_calls {
        match s.next_chunk(&mut buf) {
            Ok(Some(n)) => {
                produced.extend_from_slice(&buf[..n]);
                v.check_released(b, what, &produced);
            }
            Ok(None) => {
                outcome = Some(Ok(()));
                break;
            }
            Err(e) => {
                outcome = Some(Err(e));
                break;
            }
        }
    }
    let outcome = outcome.unwrap_or_else(|| panic!("tcId {id} [{}] {what}: stream did not end", b.name()));
    v.check_released(b, what, &produced);
    if v.valid {
        outcome.unwrap_or_else(|e| panic!("tcId {id} [{}] {what}: valid vector failed: {e}", b.name()));
        v.check_message(b, what, &produced);
        for _ in 0..3 {
            assert!(matches!(s.next_chunk(&mut buf), Ok(None)), "tcId {id} [{}] {what}: not done after end", b.name());
        }
    } else {
        assert!(outcome.is_err(), "tcId {id} [{}] {what}: invalid vector ended cleanly", b.name());
        for i in 0..3 {
            assert!(s.next_chunk(&mut buf).is_err(), "tcId {id} [{}] {what}: error not sticky (call {i})", b.name());
        }
    }
}

/// Raw mode: the body after the header, with `aeadKey` and `baseNonce`.
fn chunked_raw(b: Backend, v: &Chunked) {
    let (Some(aead_key), Some(base_nonce)) = (&v.aead_key, v.base_nonce) else { return };
    let id = v.id;
    let body = &v.ct[HEADER_LEN..];
    let p = match Payload::open_raw(b, aead_key, base_nonce, body) {
        Ok(p) => p,
        Err(e) => {
            assert!(!v.valid, "tcId {id} [{}] raw: open_raw failed on a valid vector: {e}", b.name());
            return;
        }
    };
    let auth = p.authenticate_length();
    assert!(v.valid_final_chunk || auth.is_ok() == v.valid, "tcId {id} [{}] raw: authenticate_length", b.name());
    let (produced, ok) = decrypt_all(&p);
    v.check_released(b, "raw", &produced);
    assert_eq!(ok, v.valid, "tcId {id} [{}] raw: decryption result", b.name());
    if v.valid {
        v.check_message(b, "raw", &produced);
    }
}

/// Encryption known answer: the message re-encrypted with the vector's salt.
fn chunked_encrypt(b: Backend, v: &Chunked, msg: &[u8]) {
    let id = v.id;
    let salt: [u8; SALT_LEN] = v.ct[..SALT_LEN].try_into().unwrap();
    assert_eq!(chunked::ciphertext_len(msg.len() as u64), Some(v.ct.len() as u64), "tcId {id}: ciphertext_len");
    // Once in one write, once in odd-sized writes that straddle chunk boundaries.
    for step in [msg.len().max(1), 7919] {
        let mut enc = Encryptor::with_salt(b, &v.key, &v.ctx, salt, Vec::new()).unwrap();
        for piece in msg.chunks(step) {
            enc.write(piece).unwrap();
        }
        let (out, n) = enc.finish().unwrap();
        assert_eq!(n, out.len() as u64);
        assert!(out == v.ct, "tcId {id} [{}]: encryption (writes of {step}) differs from the vector", b.name());
    }
}

#[test]
fn c2sp_chunked_encryption_aes_256_gcm() {
    let file = load("c2sp_chunked_encryption_aes_256_gcm_test.json");
    assert_eq!(file["algorithm"], "Cobblestone-256");
    let (mut seen, mut valid, mut raw, mut encrypted) = (0, 0, 0, 0);
    for g in groups(&file) {
        assert_eq!(str_field(g, "aead"), "AEAD_AES_256_GCM");
        assert_eq!(str_field(g, "sha"), "SHA-512");
        for t in tests(g) {
            let v = Chunked::parse(t);
            seen += 1;
            valid += usize::from(v.valid);
            raw += usize::from(v.aead_key.is_some());
            for &b in Backend::ALL {
                let msg = chunked_random_access(b, &v);
                chunked_streaming(b, &v, &v.ct[..], "streaming");
                chunked_streaming(b, &v, Trickle { data: &v.ct, step: 1021 }, "streaming (short reads)");
                chunked_raw(b, &v);
                if v.valid {
                    chunked_encrypt(b, &v, &msg.unwrap());
                    encrypted += 1;
                }
                if v.invalid_key_size {
                    let salt = [0u8; SALT_LEN];
                    let enc = Encryptor::with_salt(b, &v.key, &v.ctx, salt, Vec::new());
                    assert!(enc.is_err(), "tcId {} [{}]: encryptor accepted a bad key size", v.id, b.name());
                }
            }
        }
    }
    assert_eq!(seen, number_of_tests(&file), "chunked: tests run vs numberOfTests");
    assert_eq!((seen, valid, raw), (35, 10, 25), "chunked: (tests, valid, raw-mode) counts changed");
    assert_eq!(encrypted, valid * Backend::ALL.len());
    println!(
        "c2sp chunked: {seen} vectors x {} backends; {valid} valid (also re-encrypted), {raw} in raw mode",
        Backend::ALL.len()
    );
}

// ----------------------------------------------------------------------------------
// AES-GCM

#[test]
fn aes_gcm() {
    let file = load("aes_gcm_test.json");
    let (mut seen, mut run, mut not_applicable) = (0, 0, 0);
    for g in groups(&file) {
        let n = tests(g).len();
        seen += n;
        let sizes = (g["keySize"].as_u64(), g["ivSize"].as_u64(), g["tagSize"].as_u64());
        if sizes != (Some(256), Some(96), Some(128)) {
            // AES-128/192, other IV sizes: outside the AES-256-GCM / 96-bit nonce API.
            not_applicable += n;
            continue;
        }
        for t in tests(g) {
            let id = tc_id(t);
            let key: [u8; KEY_LEN] = hex_field(t, "key").try_into().unwrap();
            let nonce: [u8; NONCE_LEN] = hex_field(t, "iv").try_into().unwrap();
            let (aad, msg, ct, tag) =
                (hex_field(t, "aad"), hex_field(t, "msg"), hex_field(t, "ct"), hex_field(t, "tag"));
            let valid = is_valid(t);
            for &b in Backend::ALL {
                let k = b.key(&key);
                // Pre-filled, so that a failure that leaves the buffer alone is caught.
                let mut out = vec![0xa5u8; ct.len()];
                let r = k.open_to(&nonce, &aad, &ct, &tag, &mut out);
                if valid {
                    assert!(r.is_ok(), "tcId {id} [{}]: open failed", b.name());
                    assert_eq!(out, msg, "tcId {id} [{}]: plaintext", b.name());
                    let mut in_out = msg.clone();
                    let sealed_tag = k.seal_in_place(&nonce, &aad, &mut in_out).unwrap();
                    assert_eq!(in_out, ct, "tcId {id} [{}]: seal ciphertext", b.name());
                    assert_eq!(sealed_tag[..], tag[..], "tcId {id} [{}]: seal tag", b.name());
                } else {
                    assert!(r.is_err(), "tcId {id} [{}]: invalid vector opened", b.name());
                    assert!(out.iter().all(|&x| x == 0), "tcId {id} [{}]: output not zeroized", b.name());
                }
            }
            assert_eq!(tag.len(), TAG_LEN);
            run += 1;
        }
    }
    assert_eq!(seen, number_of_tests(&file), "aes-gcm: tests seen vs numberOfTests");
    assert_eq!(run, 66, "aes-gcm: number of AES-256 / 96-bit IV / 128-bit tag tests changed");
    println!(
        "aes-gcm: {run} tests x {} backends; {not_applicable} not applicable (other key/IV sizes)",
        Backend::ALL.len()
    );
}

// ----------------------------------------------------------------------------------
// AES-KWP

#[test]
fn aes_kwp() {
    let file = load("aes_kwp_test.json");
    let (mut seen, mut run, mut not_applicable) = (0, 0, 0);
    for g in groups(&file) {
        let key_size = g["keySize"].as_u64().unwrap();
        let n = tests(g).len();
        seen += n;
        let supported = match key_size {
            128 | 256 => true,
            192 => cfg!(feature = "rustcrypto"),
            other => panic!("aes-kwp: unexpected keySize {other}"),
        };
        if !supported {
            // aws-lc-rs has no AES-192 key wrap; without `rustcrypto` it must be refused.
            for t in tests(g) {
                let kek = hex_field(t, "key");
                assert_eq!(kek.len(), 24);
                assert!(kwp::wrap(&kek, &hex_field(t, "msg")).is_err(), "tcId {}: 192-bit KEK accepted", tc_id(t));
                assert!(kwp::unwrap(&kek, &hex_field(t, "ct")).is_err(), "tcId {}: 192-bit KEK accepted", tc_id(t));
            }
            println!("aes-kwp: {n} tests with 192-bit KEKs not applicable (needs the `rustcrypto` feature)");
            not_applicable += n;
            continue;
        }
        for t in tests(g) {
            let id = tc_id(t);
            let (kek, msg, ct) = (hex_field(t, "key"), hex_field(t, "msg"), hex_field(t, "ct"));
            assert_eq!(kek.len() as u64 * 8, key_size);
            let unwrapped = kwp::unwrap(&kek, &ct).unwrap();
            let wrapped = kwp::wrap(&kek, &msg);
            if is_valid(t) {
                assert_eq!(unwrapped.as_deref().map(|m| &m[..]), Some(&msg[..]), "tcId {id}: unwrap");
                assert_eq!(wrapped.unwrap(), ct, "tcId {id}: wrap");
            } else {
                assert!(unwrapped.is_none(), "tcId {id}: invalid wrapping unwrapped");
                // `msg` is the key the invalid wrapping was derived from: wrapping it
                // must refuse (empty key) or give the correct wrapping, never `ct`.
                assert!(wrapped.map_or(true, |w| w != ct), "tcId {id}: wrap produced the invalid wrapping");
            }
            run += 1;
        }
    }
    assert_eq!(seen, number_of_tests(&file), "aes-kwp: tests seen vs numberOfTests");
    let expected = if cfg!(feature = "rustcrypto") { 75 + 85 + 94 } else { 75 + 94 };
    assert_eq!(run, expected, "aes-kwp: number of applicable tests changed");
    println!("aes-kwp: {run} tests run, {not_applicable} not applicable");
}

// ----------------------------------------------------------------------------------
// Ed25519

#[test]
fn ed25519() {
    let file = load("ed25519_test.json");
    let mut seen = 0;
    let mut mismatches = Vec::new();
    for g in groups(&file) {
        assert_eq!(str_field(&g["publicKey"], "curve"), "edwards25519");
        let pk = hex_field(&g["publicKey"], "pk");
        for t in tests(g) {
            seen += 1;
            let (msg, sig) = (hex_field(t, "msg"), hex_field(t, "sig"));
            let expected = is_valid(t);
            if sign::verify(&pk, &msg, &sig) != expected {
                mismatches.push(format!(
                    "tcId {} ({}, {:?}): expected {expected}",
                    tc_id(t),
                    str_field(t, "comment"),
                    t["flags"]
                ));
            }
        }
    }
    assert!(mismatches.is_empty(), "ed25519 disagreements with Wycheproof:\n{}", mismatches.join("\n"));
    assert_eq!(seen, number_of_tests(&file), "ed25519: tests seen vs numberOfTests");
    assert_eq!(seen, 151);
    println!("ed25519: {seen} tests");
}
