//! Load on the key service (`shardlock keyd`, docs/KEY-SERVICE.md): a 10,000-shard
//! manifest, N clients starting at once against 1 and 2 replicas (in this process, on
//! loopback, TLS 1.3), then time to first batch through the service and with a local
//! keyring, in the same run.
//!
//! Phase 1 (raw): each client registers the manifest and releases all 10,000 shards in
//! requests of 64 (what the loader's client sends), round robin over the replicas;
//! reported: releases/s, p50/p99 request latency, CPU seconds per 1,000 releases.
//! Phase 2 (loaders): N loaders built at once through the service, time to first batch
//! (median and max) beside the same with the keyring file.
//!
//! Run: `cargo run --release -p shardlock-benches --features keyd --example keyd_load [N]`
#![allow(missing_docs, clippy::unwrap_used)]

/// The test PKI the key service's integration tests use (CA, server certificate, raw client).
#[path = "../../loader-core/tests/common/pki.rs"]
mod pki;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use shardlock::service::{KeyServiceProvider, ServiceOptions};
use shardlock::{DatasetWriter, Field, IssuerKey, KeyService, KeydConfig, Keyring, Loader, Operation, PackOptions};
use shardlock::{Schema, ShardSet, Shuffle, Token, TokenSpec};

const SHARDS: usize = 10_000;
const BATCH: usize = 64;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let clients: usize = std::env::args().nth(1).map_or(8, |a| a.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let keyring = Arc::new(Keyring::create(&dir.path().join("keyring.json")).unwrap());
    let issuer = IssuerKey::generate().unwrap();
    let trust = issuer.trust_anchor();
    let data = dir.path().join("ds");
    let t = Instant::now();
    let schema = Schema::new(vec![Field::bytes("x")]).unwrap();
    let mut opts = PackOptions::new("keyd-load");
    opts.shard_size = 1;
    let mut w = DatasetWriter::create(&data, schema, opts, &*keyring, &issuer).unwrap();
    for i in 0..SHARDS {
        w.write_sample(&[format!("sample-{i:05}").as_bytes()]).unwrap();
    }
    w.finish().unwrap();
    let manifest = std::fs::read(data.join("manifest.json")).unwrap();
    println!("packed {SHARDS} shards in {:.1?} (manifest {} KiB)", t.elapsed(), manifest.len() >> 10);
    let pki = pki::Pki::new(dir.path());
    let (cert, key) = pki.server();
    let ca = pki.ca();
    let spec = TokenSpec {
        dataset: "keyd-load".into(),
        principal: "bench".into(),
        shards: ShardSet::All,
        ops: vec![Operation::Read],
        expires: SystemTime::now() + Duration::from_secs(3600),
        not_before: None,
        min_generation: None,
    };
    let token = Token::issue(&issuer, &spec).unwrap();
    let bearer = token.to_base64().unwrap().to_string();

    for replicas in [1usize, 2] {
        let services: Vec<KeyService> = (0..replicas)
            .map(|_| {
                let mut cfg = KeydConfig::new(
                    "127.0.0.1:0".parse().unwrap(),
                    keyring.clone(),
                    vec![trust],
                    cert.clone(),
                    key.clone(),
                );
                // A log line per request would measure stderr, not the service.
                cfg.log = Box::new(std::io::sink());
                KeyService::start(cfg).unwrap()
            })
            .collect();
        let urls: Vec<String> = services.iter().map(|s| format!("https://{}", s.local_addr())).collect();
        // Phase 1: raw releases, all clients at once.
        let barrier = Arc::new(std::sync::Barrier::new(clients));
        let cpu0 = shardlock::primitives::process_cpu_seconds();
        let t = Instant::now();
        let lat: Vec<f64> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..clients)
                .map(|c| {
                    let (urls, pki, manifest, bearer, barrier) = (&urls, &pki, &manifest, &bearer, barrier.clone());
                    s.spawn(move || {
                        let http = pki.raw_client(None);
                        barrier.wait();
                        let mut digest = String::new();
                        for u in urls {
                            // At most four registrations run at once; the rest are told to retry.
                            loop {
                                let r = http.post(format!("{u}/v1/manifests")).body(manifest.clone()).send().unwrap();
                                let busy = r.status().as_u16() == 503;
                                let v: serde_json::Value = serde_json::from_str(&r.text().unwrap()).unwrap();
                                if busy {
                                    std::thread::sleep(Duration::from_millis(50));
                                    continue;
                                }
                                digest = v["digest"].as_str().unwrap().to_owned();
                                break;
                            }
                        }
                        let mut lat = Vec::new();
                        for (k, first) in (0..SHARDS).step_by(BATCH).enumerate() {
                            let shards: Vec<usize> = (first..(first + BATCH).min(SHARDS)).collect();
                            let u = &urls[(c + k) % urls.len()];
                            let t = Instant::now();
                            let r = http
                                .post(format!("{u}/v1/release"))
                                .header("authorization", format!("Bearer {bearer}"))
                                .body(serde_json::json!({"manifest": digest, "shards": shards}).to_string())
                                .send()
                                .unwrap();
                            assert_eq!(r.status().as_u16(), 200);
                            let body = r.text().unwrap();
                            lat.push(t.elapsed().as_secs_f64() * 1e3);
                            assert!(!body.contains("denied"));
                        }
                        lat
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let wall = t.elapsed().as_secs_f64();
        let cpu = shardlock::primitives::process_cpu_seconds() - cpu0;
        let releases = (clients * SHARDS) as f64;
        let mut lat = lat;
        println!(
            "{replicas} replica(s), {clients} clients x {SHARDS} shards in requests of {BATCH}: {:.0} releases/s, \
             request p50 {:.2} ms p99 {:.2} ms, {:.3} CPU s per 1,000 releases (clients included), {wall:.2} s",
            releases / wall,
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            cpu / releases * 1000.0
        );
        // Phase 2: N loaders start at once; time to first batch, service vs keyring.
        for mode in ["service", "keyring"] {
            let barrier = Arc::new(std::sync::Barrier::new(clients));
            let mut firsts: Vec<f64> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..clients)
                    .map(|c| {
                        let (urls, ca, data, token, keyring, barrier) =
                            (&urls, &ca, &data, &token, keyring.clone(), barrier.clone());
                        s.spawn(move || {
                            let keys: Arc<dyn shardlock::KeyProvider> = if mode == "service" {
                                let mut o = ServiceOptions::default();
                                o.tls.ca_cert = Some(ca.clone());
                                Arc::new(KeyServiceProvider::open(&urls[c % urls.len()], o).unwrap())
                            } else {
                                keyring
                            };
                            barrier.wait();
                            let t = Instant::now();
                            let mut l = Loader::builder(data)
                                .key_provider(keys)
                                .token_value(token.clone())
                                .trust_anchor(trust)
                                .batch_size(256)
                                .shuffle(Shuffle::Global)
                                .seed(c as u64)
                                .workers(2)
                                .build()
                                .unwrap();
                            l.next().unwrap().unwrap();
                            t.elapsed().as_secs_f64() * 1e3
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            println!(
                "  {clients} loaders at once via {mode:>7}: time to first batch (256 samples from 256 shards) median {:.1} ms, max {:.1} ms",
                pct(&mut firsts, 0.5),
                pct(&mut firsts, 1.0)
            );
        }
        for s in services {
            s.shutdown().unwrap();
        }
    }
}
