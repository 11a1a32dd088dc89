//! `log_record`: [`record::decode`] on arbitrary bytes, and on the same bytes with their record
//! framing repaired ([`crate::reseal`]). Every record that decodes is re-encoded with
//! [`record::encode`] and must decode to the same sequence and body.

use qmesh_sidecar::store::record::{self, HEADER};

/// One fuzz input.
pub fn run(data: &[u8]) {
    check(data);
    let sealed = crate::reseal(data);
    if sealed != data {
        check(&sealed);
    }
}

/// Decodes the records of `data` one after the other, as replay does, until one fails.
fn check(data: &[u8]) {
    let mut pos = 0usize;
    while pos < data.len() {
        let Ok((seq, body, used)) = record::decode(&data[pos..]) else {
            return;
        };
        assert!(
            (HEADER + 9..=data.len() - pos).contains(&used),
            "decode used {used} bytes of {}",
            data.len() - pos
        );
        let mut again = Vec::new();
        record::encode(seq, &body, &mut again);
        let (seq2, body2, used2) = match record::decode(&again) {
            Ok(decoded) => decoded,
            Err(e) => panic!("a re-encoded record does not decode: {e:?} ({body:?})"),
        };
        assert_eq!(seq, seq2, "sequence changed in the round trip");
        assert_eq!(body, body2, "body changed in the round trip");
        assert_eq!(used2, again.len(), "re-encoded record not used whole");
        pos += used;
    }
}
