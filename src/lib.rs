//! induct_fast: scores for induction circuits over attention patterns, and per-token losses.
//!
//! The core modules are pure Rust (ndarray views in, owned arrays out) and are tested by
//! `cargo test` alone; `bindings` (feature `python`) is the only code that knows about Python.

pub mod attention;
pub mod batched;
mod diagonals;
pub mod error;
pub mod logsumexp;
pub mod losses;
pub mod scores;
pub mod simd;
pub mod stack;
pub mod targets;
pub mod threads;

#[cfg(feature = "python")]
mod bindings;

pub use attention::{
    attention_patterns, scores_and_lse_from_qk, scores_from_qk, AttentionOptions, Layout, LseArray, LseOptions,
};
pub use error::{Error, Result};
pub use losses::token_losses;
pub use scores::{
    detection_scores, detection_scores_of_kinds, head_scores, per_query_scores, Detection, DetectionOptions, Measure,
    Reduce, ScoreOptions,
};
pub use targets::Kind;
