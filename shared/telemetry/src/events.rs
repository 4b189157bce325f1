//! Telemetry events shared by every component. Each `emit` writes the log
//! line and the metric together, with the same bounded labels.

use std::fmt::Display;
use std::sync::OnceLock;

static COMPONENT: OnceLock<&'static str> = OnceLock::new();

pub(crate) fn set_component(component: &'static str) {
    let _ = COMPONENT.set(component);
}

/// The component name given to [`crate::init`] (`unknown` before it).
pub fn component() -> &'static str {
    COMPONENT.get().copied().unwrap_or("unknown")
}

/// Something went wrong inside the component (not a client mistake).
/// `code` is a closed-set snake_case code; the message goes to the log only.
pub struct ComponentError<'a> {
    pub code: &'static str,
    pub message: &'a dyn Display,
}

impl ComponentError<'_> {
    pub fn emit(self) {
        tracing::error!(error.code = self.code, "{}", self.message);
        metrics::counter!(
            "component_errors_total",
            "component" => component(),
            "error_code" => self.code
        )
        .increment(1);
    }
}
