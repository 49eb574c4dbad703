//! Record-batch validation as the produce path runs it: split into batches (header and CRC), then
//! every record walked through the bounded decoder; plus the fetch trimming and the ListOffsets
//! record search over the same bytes, and `strom consume`'s reading of fetched records (a
//! hostile broker's answer). Errors are expected; panics and unbounded memory are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strom::storage::{batch, records};

fuzz_target!(|data: &[u8]| {
    let Some((flags, bytes)) = data.split_first() else {
        return;
    };
    let keys_required = flags & 1 == 1;
    // Most random bytes fail the CRC; also walk the records of a header that parses, so the
    // record decoder itself is reached.
    if let Ok(header) = batch::BatchHeader::parse(bytes) {
        if bytes.len() >= header.size_bytes {
            let _ = batch::check_records(bytes, &header, keys_required);
            let _ = records::first_at_or_after(bytes, i64::from(*flags));
        }
    }
    if let Ok(batches) = batch::split_batches(bytes) {
        for (pos, header) in batches {
            if let Some(one) = bytes.get(pos..pos + header.size_bytes) {
                let _ = batch::check_records(one, &header, keys_required);
            }
        }
    }
    let _ = batch::whole_batches_within(bytes, usize::from(*flags) * 64);
    let _ = strom::client::records::for_each(
        &bytes::Bytes::copy_from_slice(bytes),
        i64::from(*flags) - 128,
        |_| true,
    );
});
