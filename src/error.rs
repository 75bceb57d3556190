//! The one error type of the core. Every variant names the argument, what was expected and what
//! came, so the binding layer can pass the message to Python unchanged (as a ValueError).

use std::fmt::Display;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{arg}: expected {expected}, got {got}")]
pub struct Error {
    pub arg: &'static str,
    pub expected: String,
    pub got: String,
}

impl Error {
    pub fn invalid(arg: &'static str, expected: impl Display, got: impl Display) -> Self {
        Error { arg, expected: expected.to_string(), got: got.to_string() }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `(2, 3, 4)`-style rendering of a shape, as numpy prints it.
pub fn shape_str(shape: &[usize]) -> String {
    match shape {
        [one] => format!("({one},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    }
}
