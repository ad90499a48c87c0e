//! Caller hooks into the two long calls of the library: [`RunHooks`] for
//! [`Session::run_with_hooks`](crate::Session::run_with_hooks) (a per-token callback and an
//! abort poll) and [`LoadProgress`] for
//! [`Model::load_with_progress`](crate::Model::load_with_progress). Stopping is reported as
//! [`Error::Aborted`], which is neither a failure of the input nor of the runtime.

use crate::{Error, Result};

/// What a run tells its caller and asks it. Both hooks are optional; `RunHooks::default()` is
/// a plain run.
#[derive(Default)]
pub struct RunHooks<'a> {
    /// Called with every generated token id, as it is produced.
    pub on_token: Option<&'a mut dyn FnMut(u32)>,
    /// Polled between stages (before the run, after the prompt, after the LLM prefill, before
    /// every decode step, before the segmentation head, before the mask decoder and before the
    /// post-processing); `true` stops the run with [`Error::Aborted`] and no output.
    pub should_abort: Option<&'a mut dyn FnMut() -> bool>,
}

impl RunHooks<'_> {
    /// Polls `should_abort`; `at` says where the run stopped ("after the LLM prefill").
    pub(crate) fn check(&mut self, at: &str) -> Result<()> {
        poll(&mut self.should_abort, at)
    }
}

/// [`RunHooks::check`] on the abort hook alone (so the token hook can be borrowed beside it).
pub(crate) fn poll(should_abort: &mut Option<&mut dyn FnMut() -> bool>, at: &str) -> Result<()> {
    let stop = match should_abort.as_mut() {
        Some(f) => f(),
        None => false,
    };
    if stop {
        Err(Error::Aborted(format!("the run was stopped {at}")))
    } else {
        Ok(())
    }
}

/// Load progress in [0, 1]: never decreasing, 1.0 only at the end. The callback returns false
/// to cancel ([`Error::Aborted`]).
pub(crate) struct LoadProgress<'a> {
    f: &'a mut dyn FnMut(f32) -> bool,
    last: f32,
}

impl<'a> LoadProgress<'a> {
    pub(crate) fn new(f: &'a mut dyn FnMut(f32) -> bool) -> Self {
        LoadProgress { f, last: 0.0 }
    }

    /// Reports `p` (clamped so the sequence never goes down and stays in [0, 1]).
    pub(crate) fn report(&mut self, p: f32) -> Result<()> {
        let p = if p.is_finite() { p } else { self.last };
        self.last = p.clamp(self.last, 1.0);
        if (self.f)(self.last) {
            Ok(())
        } else {
            Err(Error::Aborted(format!(
                "the model load was cancelled by the progress callback at {:.0}%",
                self.last * 100.0
            )))
        }
    }
}
