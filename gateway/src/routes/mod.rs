//! The public API (DESIGN §2a).

pub mod approvals;
pub mod runs;

/// Every route template; the only values the `route` label can take
/// (besides `unmatched`).
pub const TEMPLATES: [&str; 5] = [
    runs::COLLECTION,
    runs::ITEM,
    approvals::APPROVE,
    approvals::REJECT,
    crate::openapi::PATH,
];
