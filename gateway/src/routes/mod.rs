//! The public API (DESIGN §2a).

pub mod runs;

/// Every route template; the only values the `route` label can take
/// (besides `unmatched`).
pub const TEMPLATES: [&str; 2] = [runs::COLLECTION, runs::ITEM];
