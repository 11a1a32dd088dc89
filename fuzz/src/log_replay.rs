//! `log_replay`: the fuzz input becomes the files of a log directory, which is opened with
//! [`DiskLog::open`] (replaying the segments and the dedup journal); opening must give `Ok` or an
//! I/O error, never a panic. What it recovers is checked, and a second open of the same directory
//! (after the first one truncated and set aside what it refused) must recover the same messages.
//!
//! Input layout (see [`Input::parse`]):
//!
//! ```text
//!   flags: u8 │ seg1_len: u16 LE │ seg2_len: u16 LE │ seg1 bytes │ seg2 bytes │ ids bytes
//!   flags: 1 = reseal every file (repair len/crc, see crate::reseal), 2 = write segment 2,
//!          4 = write the dedup journal 00000000000000000001.ids, 8 = the second segment is
//!          number 3 (a gap) instead of 2
//! ```
//!
//! Inputs shorter than the 5-byte header are one raw segment `00000000000000000001.log`.

use std::{collections::BTreeMap, path::Path};

use qmesh_sidecar::store::{DiskLog, Recovered, StoreConfig};

const RESEAL: u8 = 1;
const SECOND_SEGMENT: u8 = 2;
const IDS: u8 = 4;
const GAP: u8 = 8;

/// The files one input writes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Input {
    /// `00000000000000000001.log`.
    pub segment1: Vec<u8>,
    /// `00000000000000000002.log` (or `…3.log` with `gap`), if any.
    pub segment2: Option<Vec<u8>>,
    /// The second segment is number 3.
    pub gap: bool,
    /// `00000000000000000001.ids`, if any.
    pub ids: Option<Vec<u8>>,
}

impl Input {
    /// Splits a fuzz input into files (never fails: lengths are cut to what is there).
    pub fn parse(data: &[u8]) -> Self {
        if data.len() < 5 {
            return Self {
                segment1: data.to_vec(),
                ..Self::default()
            };
        }
        let flags = data[0];
        let len1 = usize::from(u16::from_le_bytes([data[1], data[2]]));
        let len2 = usize::from(u16::from_le_bytes([data[3], data[4]]));
        let rest = &data[5..];
        let (seg1, rest) = rest.split_at(len1.min(rest.len()));
        let (seg2, ids) = rest.split_at(len2.min(rest.len()));
        let fix = |b: &[u8]| {
            if flags & RESEAL != 0 {
                crate::reseal(b)
            } else {
                b.to_vec()
            }
        };
        Self {
            segment1: fix(seg1),
            segment2: (flags & SECOND_SEGMENT != 0).then(|| fix(seg2)),
            gap: flags & GAP != 0,
            ids: (flags & IDS != 0).then(|| fix(ids)),
        }
    }

    /// The fuzz input that [`Input::parse`]s back to these files, unsealed (used to write seeds).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut flags = 0;
        let seg2 = self.segment2.as_deref().unwrap_or_default();
        if self.segment2.is_some() {
            flags |= SECOND_SEGMENT;
        }
        if self.gap {
            flags |= GAP;
        }
        if self.ids.is_some() {
            flags |= IDS;
        }
        let mut out = vec![flags];
        out.extend_from_slice(&(self.segment1.len() as u16).to_le_bytes());
        out.extend_from_slice(&(seg2.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.segment1);
        out.extend_from_slice(seg2);
        out.extend_from_slice(self.ids.as_deref().unwrap_or_default());
        out
    }

    /// Writes the files into `dir`.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::write(dir.join("00000000000000000001.log"), &self.segment1)?;
        if let Some(seg2) = &self.segment2 {
            let id = if self.gap { 3 } else { 2 };
            std::fs::write(dir.join(format!("{id:020}.log")), seg2)?;
        }
        if let Some(ids) = &self.ids {
            std::fs::write(dir.join("00000000000000000001.ids"), ids)?;
        }
        Ok(())
    }
}

/// What a recovery gave, comparably: sequence → (queue, message id, pending with attempts).
type State = BTreeMap<u64, (String, String, Vec<(String, u32)>)>;

fn state_of(recovered: Vec<Recovered>) -> State {
    recovered
        .into_iter()
        .map(|r| (r.sequence, (r.queue, r.message.id, r.pending)))
        .collect()
}

/// Opens the log in `dir`, checks what it recovered and returns it (`None` on an I/O error).
fn open_and_recover(dir: &Path) -> Option<State> {
    let log = DiskLog::open(StoreConfig::new(dir)).ok()?;
    let recovered = log.recover();
    let next = log.next_sequence();
    let mut last = None;
    for r in &recovered {
        assert!(
            r.sequence < next,
            "recovered sequence {} not below the next free sequence {next}",
            r.sequence
        );
        assert!(
            last.is_none_or(|l| l < r.sequence),
            "recovered messages not in strictly increasing sequence order"
        );
        last = Some(r.sequence);
    }
    let _ = log.recover_remembered();
    // A second call gives nothing: recovery hands its state over once.
    assert!(log.recover().is_empty(), "recover() gave messages twice");
    Some(state_of(recovered))
}

/// One fuzz input.
pub fn run(data: &[u8]) {
    let input = Input::parse(data);
    let Ok(dir) = tempfile::Builder::new()
        .prefix("qmesh-fuzz-log-")
        .tempdir_in(crate::scratch_root())
    else {
        return;
    };
    if input.write_to(dir.path()).is_err() {
        return;
    }
    let Some(first) = open_and_recover(dir.path()) else {
        return;
    };
    // Restarting again must not lose (or invent) anything the first start recovered.
    if let Some(second) = open_and_recover(dir.path()) {
        assert_eq!(first, second, "a second open recovered something else");
    }
}
