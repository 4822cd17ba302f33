//! Micro-benchmarks of the per-request hot pieces: frame encode/decode and token
//! mint/verify, for a small and a 16 KiB payload. `cargo bench --bench hot_path`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use securesrv::frame::{self, DEFAULT_MAX_FRAME, Decoded};
use securesrv::identity::SpiffeId;
use securesrv::message::{Message, Request};
use securesrv::token::{KeyFile, MintRequest, Minter, SecretKey, Verifier, VerifierLimits};
use std::hint::black_box;

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for size in [64usize, 16 * 1024] {
        let msg = Message::Request(Request {
            id: 42,
            op: "echo".into(),
            payload: vec![7u8; size].into(),
            timeout_ms: Some(10_000),
        });
        let bytes = frame::encode_to_vec(&msg, DEFAULT_MAX_FRAME).unwrap();
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_with_input(BenchmarkId::new("encode", size), &msg, |b, m| {
            let mut out = Vec::with_capacity(bytes.len());
            b.iter(|| {
                out.clear();
                frame::encode(black_box(m), DEFAULT_MAX_FRAME, &mut out).unwrap();
            })
        });
        g.bench_with_input(BenchmarkId::new("decode", size), &bytes, |b, bytes| {
            b.iter(
                || match frame::decode::<Message>(black_box(bytes), DEFAULT_MAX_FRAME) {
                    Ok(Decoded::Complete { value, .. }) => value,
                    other => panic!("{other:?}"),
                },
            )
        });
    }
    g.finish();
}

fn tokens(c: &mut Criterion) {
    let mut g = c.benchmark_group("token");
    let w1 = SpiffeId::worker("securesrv", 1).unwrap();
    let master = KeyFile::single(1, SecretKey::from_bytes([42; 32]));
    let minter = Minter::new(master.current(), std::slice::from_ref(&w1), 5_000);
    let verifier = Verifier::new(
        &w1,
        &master.map_keys(|k| k.derive_for(&w1)),
        VerifierLimits {
            // Each iteration records a fresh request id: room for all of them.
            replay_capacity: 1 << 26,
            ..VerifierLimits::default()
        },
    );
    for size in [64usize, 16 * 1024] {
        let payload = vec![9u8; size];
        let req = MintRequest {
            audience: &w1,
            client: "spiffe://securesrv/client/default",
            op: "echo",
            payload: &payload,
        };
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("mint", size), &req, |b, req| {
            b.iter(|| minter.mint(black_box(*req), 1_000).unwrap())
        });
        g.bench_function(BenchmarkId::new("mint+verify", size), |b| {
            b.iter(|| {
                let (t, _) = minter.mint(req, securesrv::token::now_ms()).unwrap();
                verifier
                    .verify(black_box(&t), "echo", &payload, securesrv::token::now_ms())
                    .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, frames, tokens);
criterion_main!(benches);
