//! Segment codec throughput on a file of mixed data; run by `scripts/bench-codec`, which puts
//! the figures beside `b3sum` and `zstd` on the same bytes.
//!
//! `cargo bench -p lifeboat-store --bench codec -- gen PATH SIZE_MIB` writes the mixed data
//! (a third zeros, a third text-like, a third random, interleaved in 1 MiB runs);
//! `cargo bench -p lifeboat-store --bench codec -- run PATH` prints `key=value` figures.

use std::time::Instant;

use bytes::Bytes;
use lifeboat_store::codec::{self, SegmentBuilder};

const BLOCK: usize = 64 << 10;
const SEGMENT: usize = 8 << 20;
const RUN: usize = 1 << 20;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn generate(path: &str, mib: usize) {
    const WORDS: &[&str] = &[
        "the",
        "replication",
        "of",
        "disk",
        "block",
        "and",
        "point",
        "recovery",
        "to",
        "a",
        "consistent",
        "cut",
        "segment",
        "in",
        "store",
        "tag",
        "error",
        "INFO",
        "WARN",
        "agent",
        "coordinator",
        "request",
        "took",
        "ms",
        "user",
        "id",
        "GET",
        "/api/v1/items",
        "200",
        "latency",
        "bytes",
        "is",
        "for",
        "with",
        "on",
        "at",
        "from",
    ];
    let mut rng = Rng(0x5eed);
    let mut out = Vec::with_capacity(mib << 20);
    let mut kind = 0;
    while out.len() < mib << 20 {
        let start = out.len();
        match kind % 3 {
            0 => out.resize(start + RUN, 0),
            1 => {
                while out.len() < start + RUN {
                    let n = rng.next();
                    out.extend_from_slice(
                        format!(
                            "2026-11-25T18:{:02}:{:02}.{:03}Z ",
                            n % 60,
                            (n >> 8) % 60,
                            (n >> 16) % 1000
                        )
                        .as_bytes(),
                    );
                    for i in 0..(8 + (n >> 24) % 8) {
                        out.extend_from_slice(
                            WORDS[((n >> (i * 5)) as usize + i as usize) % WORDS.len()].as_bytes(),
                        );
                        out.push(b' ');
                    }
                    out.extend_from_slice(format!("{}\n", (n >> 40) % 100_000).as_bytes());
                }
                out.truncate(start + RUN);
            }
            _ => {
                while out.len() < start + RUN {
                    out.extend_from_slice(&rng.next().to_le_bytes());
                }
            }
        }
        kind += 1;
    }
    out.truncate(mib << 20);
    std::fs::write(path, out).expect("write data file");
}

/// Encodes `data` into segments the way the agent does: 64 KiB blocks, ~8 MiB segments, each
/// handed to `ship` when full (the agent uploads and drops them).
fn encode_with(data: &[u8], base: u64, mut ship: impl FnMut(Bytes)) {
    let mut b = SegmentBuilder::new(BLOCK as u32, 3);
    for (i, block) in data.chunks(BLOCK).enumerate() {
        b.add("", base + (i * BLOCK) as u64, block);
        if b.encoded_len() >= SEGMENT {
            ship(std::mem::replace(&mut b, SegmentBuilder::new(BLOCK as u32, 3)).finish());
        }
    }
    if !b.is_empty() {
        ship(b.finish());
    }
}

/// Encodes and keeps the segments (for the decode measurement).
fn encode(data: &[u8], base: u64) -> Vec<Bytes> {
    let mut segs = Vec::new();
    encode_with(data, base, |s| segs.push(s));
    segs
}

/// Encodes and drops each segment once "shipped"; returns the bytes stored.
fn encode_and_ship(data: &[u8], base: u64) -> usize {
    let mut stored = 0;
    encode_with(data, base, |s| stored += s.len());
    stored
}

/// Decodes and verifies every block of every segment, as a restore does.
fn decode(segs: &[Bytes]) -> u64 {
    let mut d = zstd::bulk::Decompressor::new().unwrap();
    let mut buf = Vec::with_capacity(BLOCK);
    let mut n = 0;
    for s in segs {
        let seg = codec::decode("bench", s.clone()).expect("valid segment");
        for e in seg.entries() {
            n += seg
                .read_block(e, &mut d, &mut buf)
                .expect("verified block")
                .len() as u64;
        }
    }
    n
}

fn run(path: &str) {
    let data = std::fs::read(path).expect("read data file");
    let total = data.len() as f64;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);

    let t = Instant::now();
    let stored = encode_and_ship(&data, 0);
    let enc1 = t.elapsed().as_secs_f64();
    let segs = encode(&data, 0);

    let t = Instant::now();
    let n = decode(&segs);
    let dec1 = t.elapsed().as_secs_f64();
    assert_eq!(n as usize, data.len());

    let part = data.len().div_ceil(threads).div_ceil(BLOCK) * BLOCK;
    let t = Instant::now();
    std::thread::scope(|s| {
        let hs: Vec<_> = data
            .chunks(part)
            .enumerate()
            .map(|(i, c)| s.spawn(move || encode_and_ship(c, (i * part) as u64)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum::<usize>()
    });
    let encn = t.elapsed().as_secs_f64();
    let parts: Vec<Vec<Bytes>> = data
        .chunks(part)
        .enumerate()
        .map(|(i, c)| encode(c, (i * part) as u64))
        .collect();
    let t = Instant::now();
    let n: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = parts.iter().map(|p| s.spawn(move || decode(p))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let decn = t.elapsed().as_secs_f64();
    assert_eq!(n as usize, data.len());

    let mbps = |s: f64| total / s / 1e6;
    println!("bytes={}", data.len());
    println!("threads={threads}");
    println!("stored_bytes={stored}");
    println!("encode_1t_mb_s={:.1}", mbps(enc1));
    println!("decode_1t_mb_s={:.1}", mbps(dec1));
    println!("encode_nt_mb_s={:.1}", mbps(encn));
    println!("decode_nt_mb_s={:.1}", mbps(decn));
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["gen", path, mib] => generate(path, mib.parse().expect("size in MiB")),
        ["run", path] => run(path),
        _ => eprintln!("usage: codec gen PATH SIZE_MIB | codec run PATH"),
    }
}
