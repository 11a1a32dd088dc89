//! Progress bars for long work (`demo`, `bench`, `pub --count`), drawn on stderr only when it is a
//! terminal; scripts and tests see the plain lines instead.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting towards `total`, labelled `what`; hidden unless stderr is a terminal.
pub fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style =
        ProgressStyle::with_template("{prefix:>14} [{bar:32}] {pos:>7}/{len:7}  {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(what.to_owned());
    bar
}
