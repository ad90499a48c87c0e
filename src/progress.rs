//! Progress bars on stderr for long steps (writing weights, loading, generation). Hidden when
//! the caller asked for quiet.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting `total` bytes, labelled `msg`; hidden when `enabled` is false.
pub fn bytes_bar(total: u64, msg: &'static str, enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b.set_message(msg);
    b
}
