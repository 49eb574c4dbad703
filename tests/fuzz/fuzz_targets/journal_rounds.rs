//! The shard journal's round decoder, which recovery runs on whatever a crash left in the journal
//! files. Arbitrary bytes must be an error, never a panic or an allocation sized by a length
//! field. The input is also tried with a valid magic and checksum, so that the fuzzer reaches the
//! entry parser behind them.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use strom::storage::journal::{decode_round, decode_round_header, ROUND_HEADER_BYTES};

fuzz_target!(|data: &[u8]| {
    let _ = decode_round_header(data);
    let _ = decode_round(&Bytes::copy_from_slice(data));
    if data.len() >= ROUND_HEADER_BYTES {
        let mut fixed = data.to_vec();
        fixed[0..4].copy_from_slice(&0x4e52_4a53u32.to_le_bytes());
        let payload_len = u32::try_from(fixed.len() - ROUND_HEADER_BYTES).unwrap_or(u32::MAX);
        if data[24] & 1 == 0 {
            // Half the time the length is made to match, so the CRC check is what remains.
            fixed[24..28].copy_from_slice(&payload_len.to_le_bytes());
        }
        let end = (ROUND_HEADER_BYTES
            + usize::try_from(u32::from_le_bytes(fixed[24..28].try_into().unwrap())).unwrap())
        .min(fixed.len());
        let crc = crc32c::crc32c(&fixed[8..end]);
        fixed[4..8].copy_from_slice(&crc.to_le_bytes());
        if let Ok((header, entries)) = decode_round(&Bytes::from(fixed)) {
            assert_eq!(header.entries as usize, entries.len());
        }
    }
});
