//! Manifests: arbitrary bytes, read as the manifests source reads a file (lossy UTF-8,
//! multi-document YAML), then model, plan, desired maps and render for a few node names.
#![no_main]
use std::path::Path;

use lb_fuzz::{check_parse_error, check_pipeline, PATH};
use lb_userspace::control::source::{parse_into, Objects};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut objects = Objects::default();
    match parse_into(Path::new(PATH), &text, &mut objects) {
        // The source keeps its last good state: nothing of a failed file is used.
        Err(e) => check_parse_error(&e, &text),
        Ok(()) => check_pipeline(&objects),
    }
});
