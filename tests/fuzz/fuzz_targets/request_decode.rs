//! Request decoding for every API key and version strom serves: the first two bytes pick the API
//! and the version within its advertised range, the rest is the header after the version and the
//! body. Decoding must return a request or an error, never panic or abort, whatever the bytes say.
//! A decoded Produce request also has its records taken out of the frame, as the broker does
//! before appending them.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: strom::alloc::GuardedAlloc = strom::alloc::GuardedAlloc;

fuzz_target!(|data: &[u8]| {
    let [pick, version_pick, rest @ ..] = data else {
        return;
    };
    let apis = strom::protocol::SUPPORTED_APIS;
    let (key, min, max) = apis[usize::from(*pick) % apis.len()];
    let span = u16::try_from(max - min + 1).unwrap_or(1);
    let version = min + i16::try_from(u16::from(*version_pick) % span).unwrap_or(0);
    let mut frame = Vec::with_capacity(4 + rest.len());
    frame.extend_from_slice(&(key as i16).to_be_bytes());
    frame.extend_from_slice(&version.to_be_bytes());
    frame.extend_from_slice(rest);
    let frame = bytes::Bytes::from(frame);
    if let Ok(decoded) = strom::handlers::decode_request(frame.clone()) {
        if let kafka_protocol::messages::RequestKind::Produce(mut request) = decoded.request {
            drop(decoded.header);
            let _ = strom::handlers::produce::take_records(&mut request, frame);
        }
    }
});
