//! strom's own metadata loaders: the checksummed file envelope, the cluster's topic table, a
//! partition's metadata, its producer snapshot and its saved transaction state (rkyv, validated
//! by bytecheck), the group records replayed from `__consumer_offsets`, the transaction states
//! replayed from `__transaction_state`, and the transaction markers read back from a log.
//! Arbitrary bytes must be an error, never a panic or undefined behaviour.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The envelope, for both format versions in use.
    for version in [1, 2] {
        if let Ok(payload) = strom::storage::files::check_meta(data, version) {
            let _ = strom::cluster::TopicTable::decode(&payload);
            let _ = strom::storage::partition::partition_meta_identity(&payload);
            let _ = strom::storage::partition::decode_producer_snapshot(&payload);
            let _ = strom::storage::txn::decode_saved(&payload);
        }
    }
    // The decoders behind it, on the raw bytes (a CRC would stop random input before them).
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(data.len());
    aligned.extend_from_slice(data);
    let _ = strom::cluster::TopicTable::decode(&aligned);
    let _ = strom::storage::partition::partition_meta_identity(&aligned);
    let _ = strom::storage::partition::decode_producer_snapshot(&aligned);
    let _ = strom::storage::txn::decode_saved(data);
    let _ = strom::group::records::decode_batches(bytes::Bytes::copy_from_slice(data));
    let _ = strom::txn::records::decode_batches(bytes::Bytes::copy_from_slice(data));
    if let Ok(header) = strom::storage::batch::BatchHeader::parse(data) {
        let _ = strom::storage::txn::control_outcome(data, &header);
    }
});
