//! The command line: clap's definitions of every command, its arguments and their help texts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use shardlock::Backend;

use crate::args::{parse_backend, parse_size};

#[derive(Parser)]
#[command(name = "shardlock", version, about = "Encrypted, authenticated dataset shards for training", long_about = None)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Create keys: a keyring with one KEK, or an Ed25519 issuer key pair.
    #[command(subcommand)]
    Keygen(Keygen),
    /// Pack .npy files (one per field) or a directory of files into an encrypted dataset.
    Pack(PackArgs),
    /// Summarise a dataset's manifest without any key.
    Inspect(InspectArgs),
    /// Check the manifest signature and authenticate every chunk of every shard.
    Verify(VerifyArgs),
    /// Rewrap every DEK under another provider's KEK (keyring file or HSM) and re-sign the manifest.
    Rotate(RotateArgs),
    /// Stream a dataset through the loader and report throughput, latency, CPU and memory.
    Bench(BenchArgs),
    /// Issue, attenuate, inspect and revoke access tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Check the audit log's hash chain.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Upload a packed dataset directory to s3://bucket/prefix (shards first, manifest last).
    Upload(UploadArgs),
    /// Serve token-gated DEK release over HTTPS (the key service; docs/KEY-SERVICE.md).
    Keyd(KeydArgs),
    /// Verify the parts of a dataset packed with `pack --part` and sign its manifest.
    Assemble(AssembleArgs),
}

#[derive(Args)]
pub(crate) struct AssembleArgs {
    /// Dataset directory holding the shard files and part-*.json files, or the
    /// `s3://bucket/prefix` the parts were packed to (the manifest is uploaded last).
    pub(crate) dir: PathBuf,
    /// Object storage settings for an `s3://` location.
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// The data owner's issuer secret key; signs the manifest.
    #[arg(long)]
    pub(crate) issuer_key: PathBuf,
    /// Custody of the KEKs the parts were packed with (repeatable, as for readers): every
    /// shard is authenticated under its own DEK before the manifest is signed.
    #[arg(long, required = true)]
    pub(crate) keyring: Vec<String>,
    /// Generation of the manifest (default 1).
    #[arg(long)]
    pub(crate) generation: Option<u64>,
    /// Print the result as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `shardlock keyd`'s options. Each can also come from `--config FILE` (TOML, the same
/// names with `_` for `-`); a value on the command line wins.
#[derive(Args)]
pub(crate) struct KeydArgs {
    /// TOML file with any of the options below (e.g. `listen = "0.0.0.0:8443"`,
    /// `trust = ["a.pub", "https://keys.example/issuers.json"]`, `rate_limit = 5000`,
    /// `log_format = "json"`).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:8443; port 0 picks a free one, which is printed).
    #[arg(long)]
    pub(crate) listen: Option<std::net::SocketAddr>,
    /// Custody of the KEK: a keyring file, the pkcs11: URI of an HSM KEK, a transit: URI
    /// (OpenBao/Vault) or an aws-kms: URI. Repeat to serve manifests whose shards are
    /// wrapped under different custody: each DEK goes to the first that holds its KEK.
    #[arg(long)]
    pub(crate) keyring: Vec<String>,
    /// Issuer public key (.pub), or a JSON array of them, whose manifests and tokens are
    /// accepted: a file, re-read when it changes, or an https:// URL, polled; repeat for
    /// several.
    #[arg(long)]
    pub(crate) trust: Vec<String>,
    /// PEM certificate chain the service presents.
    #[arg(long)]
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key of the certificate (mode 0600).
    #[arg(long)]
    pub(crate) tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mTLS); a certificate's subject CN
    /// must then equal the token's principal.
    #[arg(long)]
    pub(crate) client_ca: Option<PathBuf>,
    /// Deny list of revoked token ids: a file, re-read when it changes, or an https://
    /// URL, polled.
    #[arg(long)]
    pub(crate) deny_list: Option<String>,
    /// PEM CA certificate(s) for https:// --trust and --deny-list URLs (default:
    /// SSL_CERT_FILE, else the system bundle).
    #[arg(long)]
    pub(crate) source_ca: Option<PathBuf>,
    /// How often https:// --trust and --deny-list URLs are fetched (default 30s).
    #[arg(long)]
    pub(crate) poll_interval: Option<String>,
    /// Format of the log on stderr: text (default) or json, one line per request and
    /// per start, shutdown, reload and fetch failure.
    #[arg(long)]
    pub(crate) log_format: Option<String>,
    /// The service's hash-chained audit log.
    #[arg(long)]
    pub(crate) audit_log: Option<PathBuf>,
    /// Allowed clock skew for token validity (default 30s).
    #[arg(long)]
    pub(crate) clock_skew: Option<String>,
    /// Refuse manifests older than this generation (rollback protection).
    #[arg(long)]
    pub(crate) min_generation: Option<u64>,
    /// Requests served at once; more are answered 503 busy (default 256).
    #[arg(long)]
    pub(crate) max_in_flight: Option<usize>,
    /// Most shards one release request may name (default 4096).
    #[arg(long)]
    pub(crate) max_shards: Option<usize>,
    /// Shard releases per second each principal may ask for (bursts of twice that);
    /// more are answered 429 rate_limited. Default: no limit.
    #[arg(long)]
    pub(crate) rate_limit: Option<f64>,
    /// Print the listening address as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Where to find an `s3://` dataset and where to cache it. Credentials come only from
/// the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), never
/// from the command line, where other users could read them.
#[derive(Args, Default)]
pub(crate) struct StoreArgs {
    /// S3 endpoint URL (default: AWS_ENDPOINT_URL / AWS_ENDPOINT, else AWS).
    #[arg(long)]
    pub(crate) s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1).
    #[arg(long)]
    pub(crate) s3_region: Option<String>,
    /// Allow a plain http:// endpoint (implied for 127.0.0.1 / localhost).
    #[arg(long)]
    pub(crate) s3_allow_http: bool,
    /// Give up on one object after this long, retries included (e.g. 120s).
    #[arg(long)]
    pub(crate) s3_timeout: Option<String>,
}

/// Object storage for readers: the store, plus the local ciphertext cache and ranged reads.
#[derive(Args, Default)]
pub(crate) struct RemoteArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Ciphertext cache directory (default: $SHARDLOCK_CACHE_DIR, else ~/.cache/shardlock).
    #[arg(long)]
    pub(crate) cache_dir: Option<PathBuf>,
    /// Bytes of shards to keep in the cache before evicting ones the plan is done with.
    #[arg(long, value_parser = parse_size)]
    pub(crate) cache_bytes: Option<u64>,
    /// Ranged GETs of just the needed chunks instead of whole shards: auto (for
    /// global shuffle when the shards do not fit in --cache-bytes), always, never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    pub(crate) range_reads: String,
}

#[derive(Args)]
pub(crate) struct UploadArgs {
    /// Packed dataset directory.
    pub(crate) dir: PathBuf,
    /// Destination, s3://bucket/prefix.
    pub(crate) dest: String,
    /// Issuer public key (.pub): only a dataset whose manifest it verifies is uploaded.
    #[arg(long)]
    pub(crate) trust: PathBuf,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Subcommand)]
pub(crate) enum TokenCmd {
    /// Issue a token with the data owner's issuer key.
    Issue {
        /// Issuer secret key file.
        #[arg(long)]
        issuer_key: PathBuf,
        /// Dataset id the token is for (as given to `pack --dataset-id`).
        #[arg(long, visible_alias = "dataset-id")]
        dataset: String,
        /// Who the token is for (recorded in the audit log).
        #[arg(long)]
        principal: String,
        /// Shards covered: "all" or a list like 0-3,7,10-12.
        #[arg(long, default_value = "all")]
        shards: String,
        /// Operations granted: read, verify.
        #[arg(long, default_value = "read")]
        ops: String,
        /// Lifetime (e.g. 90s, 30m, 1h, 7d).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Not valid before this time (RFC 3339 or Unix seconds); default now.
        #[arg(long)]
        not_before: Option<String>,
        /// Refuse datasets whose manifest generation is below N (an older pack of the
        /// same dataset id, or a rolled-back copy).
        #[arg(long, value_name = "N")]
        min_generation: Option<u64>,
        /// Token file to write (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Narrow a token offline (no key needed): fewer shards, fewer operations, sooner expiry.
    Attenuate {
        /// Token file to narrow.
        token: PathBuf,
        /// Issuer public key (.pub), to check the token before narrowing it.
        #[arg(long)]
        trust: PathBuf,
        /// Keep only these shards.
        #[arg(long)]
        shards: Option<String>,
        /// Keep only these operations.
        #[arg(long)]
        ops: Option<String>,
        /// Expire within this duration from now.
        #[arg(long)]
        ttl: Option<String>,
        /// Refuse datasets whose manifest generation is below N.
        #[arg(long, value_name = "N")]
        min_generation: Option<u64>,
        /// Token file to write (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a token's blocks, checks and revocation ids (never the token itself).
    Inspect {
        /// Token file.
        token: PathBuf,
        /// Issuer public key (.pub) to verify the signature chain.
        #[arg(long)]
        trust: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a token's revocation id to a deny list (revokes it and everything attenuated from it).
    Revoke {
        /// Token file.
        token: PathBuf,
        /// Deny-list file to append to (created if missing).
        #[arg(long)]
        deny_list: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum AuditCmd {
    /// Verify every line's hash and the chain; print the record count and head hash.
    Verify {
        /// Audit log file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Options every reader takes.
#[derive(Args)]
pub(crate) struct ReaderArgs {
    /// Keyring file holding the KEK the DEKs are wrapped under, the pkcs11: URI of an
    /// HSM KEK (RFC 7512; the PIN comes from pin-source=env:VAR or file:PATH, never the URI),
    /// a transit: or aws-kms: URI, or the https:// URL of a key service (shardlock keyd),
    /// which then holds the KEK. Repeat for a manifest whose shards are wrapped under
    /// different custody: each DEK is unwrapped by the first that holds its KEK (a key
    /// service holds every KEK, so give it last).
    #[arg(long, required = true)]
    pub(crate) keyring: Vec<String>,
    /// With an https:// key service: PEM CA certificate that signed the service's
    /// certificate (default: $SHARDLOCK_CA_CERT, $SSL_CERT_FILE, the system bundle).
    #[arg(long)]
    pub(crate) ca_cert: Option<PathBuf>,
    /// With a key service that requires mTLS: PEM client certificate (its CN is your principal).
    #[arg(long, requires = "client_key")]
    pub(crate) client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert (mode 0600).
    #[arg(long, requires = "client_cert")]
    pub(crate) client_key: Option<PathBuf>,
    /// Access token file (from `shardlock token issue`): required to read any shard
    /// (`verify` takes the data owner's --issuer-key in its place).
    #[arg(long)]
    pub(crate) token: Option<PathBuf>,
    /// Issuer public key (.pub): the trust anchor for manifest and token.
    #[arg(long)]
    pub(crate) trust: PathBuf,
    /// Deny-list file of revoked token ids, re-read when it changes.
    #[arg(long)]
    pub(crate) deny_list: Option<PathBuf>,
    /// Append every decision to this hash-chained audit log.
    #[arg(long)]
    pub(crate) audit_log: Option<PathBuf>,
    /// Allowed clock skew for token validity (e.g. 30s).
    #[arg(long, default_value = "30s")]
    pub(crate) clock_skew: String,
    /// Refuse a manifest older than this generation (rollback protection).
    #[arg(long)]
    pub(crate) min_generation: Option<u64>,
}

#[derive(Subcommand)]
pub(crate) enum Keygen {
    /// A new KEK: a keyring file (mode 0600) holding one fresh 256-bit KEK, or a
    /// non-extractable AES-256 KEK generated inside a PKCS#11 HSM.
    #[command(group(clap::ArgGroup::new("dest").required(true).args(["out", "pkcs11"])))]
    Kek {
        /// Keyring file to create (refuses to overwrite).
        #[arg(long)]
        out: Option<PathBuf>,
        /// pkcs11: URI (RFC 7512) naming the token and the new KEK's label (object=);
        /// the PIN comes from pin-source=env:VAR or file:PATH. Refuses an existing label.
        #[arg(long)]
        pkcs11: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A new Ed25519 issuer key: secret in FILE (0600), public trust anchor in FILE.pub.
    Issuer {
        /// Secret key file to create (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub(crate) struct PackArgs {
    /// Keyring file whose active KEK wraps the shard DEKs, a pkcs11: URI of an HSM KEK, a
    /// transit: URI (OpenBao/Vault Transit key) or an aws-kms: URI (KMS key).
    #[arg(long)]
    pub(crate) keyring: String,
    /// The data owner's issuer secret key; signs the manifest.
    #[arg(long, required_unless_present = "part", conflicts_with = "part")]
    pub(crate) issuer_key: Option<PathBuf>,
    /// Pack one part of a dataset packed by several workers: shards from FIRST on, at
    /// most COUNT of them (FIRST:COUNT; FIRST alone for the last part). Needs --trust
    /// instead of --issuer-key; `shardlock assemble` signs the dataset once every part is in.
    #[arg(long, value_name = "FIRST[:COUNT]", requires = "trust")]
    pub(crate) part: Option<String>,
    /// With --part: the issuer's public key (the wraps are bound to its key id).
    #[arg(long)]
    pub(crate) trust: Option<PathBuf>,
    /// Dataset id bound into every shard ([A-Za-z0-9_.:/-], 1-255 characters).
    #[arg(long)]
    pub(crate) dataset_id: String,
    /// Output directory; with --part also `s3://bucket/prefix`, where each shard goes
    /// straight to object storage as it is sealed (then `shardlock assemble s3://...`).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Object storage settings for an `s3://` --out.
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Target plaintext bytes per shard (e.g. 268435456, 64MiB, 512k).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub(crate) shard_size: u64,
    /// Replace a dataset already in the output directory.
    #[arg(long)]
    pub(crate) force: bool,
    /// Generation of the new manifest (default: one past the dataset being replaced,
    /// else 1; never at or below the one being replaced).
    #[arg(long)]
    pub(crate) generation: Option<u64>,
    /// AEAD backend.
    #[arg(long, default_value = "aws-lc-rs", value_parser = parse_backend)]
    pub(crate) backend: Backend,
    /// Shards encrypted and written at once, each on its own thread (default: the cores,
    /// at most 8). Memory: up to threads + 1 shards of --shard-size plaintext.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub(crate) threads: Option<u16>,
    /// Dataset metadata signed with the manifest, NAME=VALUE (VALUE is JSON if it parses,
    /// else a string), repeatable: e.g. --metadata 'classes=["cat","dog"]' (label names in
    /// label order, shown by inspect and Loader.classes).
    #[arg(long, value_name = "NAME=VALUE")]
    pub(crate) metadata: Vec<String>,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// What the inputs are (default: told from them; see INPUTS).
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) format: PackFormat,
    /// WebDataset: an extension whose members hold integer text, stored as an i64 scalar
    /// instead of bytes, EXT=i64 (repeatable): e.g. --parse cls=i64.
    #[arg(long, value_name = "EXT=i64")]
    pub(crate) parse: Vec<String>,
    /// Store a field's values compressed, each value its own zstd frame (random access
    /// and the schema's dtypes and shapes stay; readers decompress on their decrypt
    /// workers), FIELD=zstd or FIELD=zstd:LEVEL with LEVEL 1-19 (default 3), repeatable:
    /// e.g. --compress tokens=zstd --compress json=zstd:9.
    #[arg(long, value_name = "FIELD=zstd[:LEVEL]")]
    pub(crate) compress: Vec<String>,
    /// INPUTS: `.npy` files (field = file stem); one directory of files (one sample per
    /// file, field `data`); a WebDataset `.tar` or a directory of them (one bytes field
    /// per member extension); an image folder root/<class>/<file> (fields `image` and
    /// `label`, the class names signed as metadata `classes`). Parquet, Arrow and Hugging
    /// Face datasets: `shardlock.pack` in Python.
    #[arg(required = true)]
    pub(crate) inputs: Vec<PathBuf>,
}

/// `shardlock pack --format`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum PackFormat {
    /// Told from the inputs.
    Auto,
    /// `.npy` files, one per field.
    Npy,
    /// One directory of files, one sample per file.
    Files,
    /// WebDataset tars.
    Wds,
    /// An image folder, root/<class>/<file>.
    Imagefolder,
    /// Parquet files (from Python: `shardlock.pack`).
    Parquet,
    /// Arrow IPC files (from Python: `shardlock.pack`).
    Arrow,
}

#[derive(Args)]
pub(crate) struct InspectArgs {
    /// Dataset directory, file:// URL or s3://bucket/prefix (only the manifest is read).
    pub(crate) dir: String,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Issuer public key (.pub) to check the signature against.
    #[arg(long)]
    pub(crate) trust: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct VerifyArgs {
    /// Dataset directory, file:// URL or s3://bucket/prefix (shards are downloaded to the cache).
    pub(crate) dir: String,
    #[command(flatten)]
    pub(crate) remote: RemoteArgs,
    #[command(flatten)]
    pub(crate) reader: ReaderArgs,
    /// The data owner's issuer secret key, in place of --token: verify issues itself a
    /// 10-minute verify token for this dataset in memory (nothing is written).
    #[arg(long, conflicts_with = "token")]
    pub(crate) issuer_key: Option<std::path::PathBuf>,
    /// AEAD backend.
    #[arg(long, default_value = "aws-lc-rs", value_parser = parse_backend)]
    pub(crate) backend: Backend,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Dataset directory, file:// URL or s3://bucket/prefix.
    pub(crate) dir: String,
    #[command(flatten)]
    pub(crate) remote: RemoteArgs,
    #[command(flatten)]
    pub(crate) reader: ReaderArgs,
    /// Samples per batch.
    #[arg(long, default_value_t = 256)]
    pub(crate) batch_size: usize,
    /// Epochs to run (the first reads from disk or page cache, later ones from page cache).
    #[arg(long, default_value_t = 2)]
    pub(crate) epochs: u64,
    /// Shuffle mode: none, window, global.
    #[arg(long, default_value = "window")]
    pub(crate) shuffle: String,
    /// Decrypt worker threads (default: cores).
    #[arg(long)]
    pub(crate) workers: Option<usize>,
    /// Read only these fields (comma-separated).
    #[arg(long)]
    pub(crate) fields: Option<String>,
    /// In-flight batch memory budget (e.g. 512MiB).
    #[arg(long, default_value = "512MiB", value_parser = parse_size)]
    pub(crate) memory_budget: u64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Allow batch memory that is not locked in RAM (audited).
    #[arg(long)]
    pub(crate) allow_unlocked_memory: bool,
    /// Deliver batches to this GPU ("cuda:N") instead of host memory; the numbers
    /// count a batch once its copy to the device completed (needs the `cuda` feature
    /// and an NVIDIA driver).
    #[arg(long)]
    pub(crate) device: Option<String>,
    /// With --device: copy from pageable memory instead of registering the locked
    /// batch buffers (for confidential-computing GPUs).
    #[arg(long, requires = "device")]
    pub(crate) pageable: bool,
    /// Decode a bytes field of JPEG/PNG/WebP images on the workers:
    /// `FIELD=train:SIZE` (RandomResizedCrop + flip) or `FIELD=eval:SIZE` (Resize +
    /// CenterCrop), optionally `:f32` / `:f16` / `:bf16` (scaled to [0, 1]; default u8),
    /// e.g. `--decode image=train:224:f32` (docs/DECODE.md). Samples/s are images/s.
    #[arg(long, value_name = "FIELD=MODE:SIZE[:DTYPE]")]
    pub(crate) decode: Vec<String>,
    /// With --decode: leave samples whose image does not decode out (audited) instead
    /// of failing.
    #[arg(long, requires = "decode")]
    pub(crate) skip_bad_images: bool,
    /// Where --decode runs: `workers` (the decrypt workers, CPU; the default) or
    /// `device` (with --device: nvJPEG and the resample kernel on the GPU).
    #[arg(long, value_name = "workers|device", default_value = "workers", requires = "decode")]
    pub(crate) decode_on: String,
    /// Also measure the ceiling in the same run and print the loader's share of it:
    /// AES-256-GCM alone on the same number of threads (page-cached mmap, 16 KiB
    /// chunks), and `openssl speed -evp aes-256-gcm -decrypt -bytes 16384 -multi N`
    /// when `openssl` is on PATH.
    #[arg(long)]
    pub(crate) ceiling: bool,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct RotateArgs {
    /// Dataset directory.
    pub(crate) dir: PathBuf,
    /// Current key provider: keyring file, pkcs11:, transit: or aws-kms: URI. Repeat when
    /// the shards are wrapped under different custody (each DEK is unwrapped by the first
    /// that holds its KEK), to move them all to --new-keyring.
    #[arg(long, required = true)]
    pub(crate) keyring: Vec<String>,
    /// Key provider whose active KEK will wrap the DEKs: keyring file, pkcs11:, transit: or aws-kms: URI.
    #[arg(long)]
    pub(crate) new_keyring: String,
    /// The issuer secret key that signed the manifest.
    #[arg(long)]
    pub(crate) issuer_key: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}
