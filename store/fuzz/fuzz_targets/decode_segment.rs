//! Fuzzes the segment decoder (`cargo +nightly fuzz run decode_segment` from `store/`): any input
//! must be rejected or decoded without panicking, and a decoded segment's blocks must verify or
//! fail cleanly. CI runs the bounded property-test version (`codec::tests`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(seg) = lifeboat_store::codec::decode("fuzz", bytes::Bytes::copy_from_slice(data)) {
        let _ = seg.verify_all();
    }
    // Also try the input as an index behind a valid footer, which skips the object hash and
    // reaches the index parser directly.
    let hash = *blake3::hash(data).as_bytes();
    let _ = lifeboat_store::codec::decode_index("fuzz", data, 16, &hash);
});
