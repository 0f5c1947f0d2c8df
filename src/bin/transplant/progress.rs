//! The progress bar of long copies, drawn on stderr when it is a terminal.
use std::io::IsTerminal;
use std::sync::OnceLock;

use indicatif::{ProgressBar, ProgressStyle};
use transplant::Progress;

/// Copies shorter than this show no progress bar.
const MIN_BYTES: u64 = 256 << 20;

/// Turns the library's progress reports into an indicatif bar.
#[derive(Default)]
pub struct Bar {
    bar: OnceLock<Option<ProgressBar>>,
}

impl Progress for Bar {
    fn start(&self, bytes: u64) {
        self.bar.get_or_init(|| {
            (bytes >= MIN_BYTES && std::io::stderr().is_terminal()).then(|| {
                // indicatif's default style shows neither the message nor units.
                let style = ProgressStyle::with_template(
                    "{msg} {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec}, {eta} left",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar());
                ProgressBar::new(bytes).with_style(style).with_message("copying")
            })
        });
    }

    fn advance(&self, bytes: u64) {
        if let Some(Some(bar)) = self.bar.get() {
            bar.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(Some(bar)) = self.bar.get() {
            bar.finish_and_clear();
        }
    }
}
