//! Which keys each query should attend to, per kind of head (DESIGN.md section 4):
//!
//! | kind            | T(i)                                           |
//! |-----------------|------------------------------------------------|
//! | previous_token  | {i-1}                                          |
//! | duplicate_token | {j < i : t[j] == t[i]}                         |
//! | induction       | {j + 1 : j < i, t[j] == t[i]}                  |
//! | offset(d)       | {i-d}                                          |
//! | bos             | {0}                                            |
//! | self            | {i}                                            |
//! | copy            | {j <= i : t[j] == t[i+1]} (keys holding the next token) |
//!
//! Token kinds walk a chain of earlier occurrences built once per token row (O(n) memory even
//! when every token repeats), so a query's targets cost O(|T(i)|) to visit. Explicit detection
//! matrices become sparse weighted rows, so a pass never re-reads a dense n×n mask.

use std::collections::HashMap;
use std::ops::Range;
use std::str::FromStr;

use crate::stack::Matrix;

use crate::error::{Error, Result};

const NONE: usize = usize::MAX;

/// A statistic computed per query row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    PreviousToken,
    DuplicateToken,
    Induction,
    Bos,
    SelfToken,
    Offset(usize),
    /// The keys holding the token that comes next: {j <= i : t[j] == t[i+1]}.
    Copy,
    /// Not a target set: the row's entropy -sum A log A.
    Entropy,
}

impl Kind {
    pub const NAMES: &'static str = "previous_token, duplicate_token, induction, copy, bos, self, entropy, offset_<d>";

    pub fn needs_tokens(self) -> bool {
        matches!(self, Kind::DuplicateToken | Kind::Induction | Kind::Copy)
    }

    /// The name results are keyed by (the inverse of `from_str`).
    pub fn name(self) -> String {
        match self {
            Kind::PreviousToken => "previous_token".into(),
            Kind::DuplicateToken => "duplicate_token".into(),
            Kind::Induction => "induction".into(),
            Kind::Bos => "bos".into(),
            Kind::SelfToken => "self".into(),
            Kind::Offset(d) => format!("offset_{d}"),
            Kind::Copy => "copy".into(),
            Kind::Entropy => "entropy".into(),
        }
    }

    /// Offsets must point inside the sequence: 1 <= d <= n-1.
    pub fn check_range(self, n: usize) -> Result<()> {
        match self {
            Kind::Offset(d) if d == 0 || d >= n.max(1) => Err(Error::invalid(
                "offset",
                format!("an offset in 1..={} for sequences of length {n}", n.saturating_sub(1)),
                d,
            )),
            _ => Ok(()),
        }
    }
}

impl FromStr for Kind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Kind> {
        let kind = match s {
            "previous_token" => Kind::PreviousToken,
            "duplicate_token" => Kind::DuplicateToken,
            "induction" => Kind::Induction,
            "bos" => Kind::Bos,
            "self" => Kind::SelfToken,
            "copy" => Kind::Copy,
            "entropy" => Kind::Entropy,
            // Only the canonical spelling, so results are keyed exactly as requested.
            _ => match s.strip_prefix("offset_").map(str::parse::<usize>) {
                Some(Ok(d)) if Kind::Offset(d).name() == s => Kind::Offset(d),
                _ => return Err(Error::invalid("kinds", format!("one of {}", Kind::NAMES), format!("{s:?}"))),
            },
        };
        Ok(kind)
    }
}

/// For each position, the previous position holding the same token (NONE if none): following the
/// chain from i visits every earlier occurrence of t[i], latest first.
pub struct TokenChain {
    prev: Vec<usize>,
}

impl TokenChain {
    pub fn new(tokens: &[i64]) -> Self {
        let mut last: HashMap<i64, usize> = HashMap::with_capacity(tokens.len());
        let prev = tokens.iter().enumerate().map(|(i, t)| last.insert(*t, i).unwrap_or(NONE)).collect();
        TokenChain { prev }
    }

    fn earlier(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        let step = |p: usize| (p != NONE).then_some(p);
        std::iter::successors(step(self.prev[i]), move |&p| step(self.prev[p]))
    }
}

/// Weighted sparse rows: the non-zero entries of an explicit detection matrix.
pub struct SparseRows {
    starts: Vec<usize>,
    keys: Vec<usize>,
    weights: Vec<f64>,
}

impl SparseRows {
    /// Keeps the non-zero entries of `d`; non-finite entries are rejected.
    pub fn from_dense(arg: &'static str, d: Matrix<'_, f64>) -> Result<Self> {
        let mut rows = SparseRows { starts: vec![0], keys: Vec::new(), weights: Vec::new() };
        for i in 0..d.n() {
            for (j, w) in d.row(i).enumerate() {
                if !w.is_finite() {
                    return Err(Error::invalid(arg, "finite values", format!("{w} at row {i}, column {j}")));
                }
                if w != 0.0 {
                    rows.keys.push(j);
                    rows.weights.push(w);
                }
            }
            rows.starts.push(rows.keys.len());
        }
        Ok(rows)
    }
}

/// The target set of every query for one kind, for one group of heads.
pub enum Targets<'a> {
    /// {i - d}; previous_token is d = 1, self is d = 0.
    Offset(usize),
    /// {0}.
    Bos,
    /// {p + shift : p earlier occurrence of t[i]}: duplicate_token (0) and induction (1).
    Chain {
        chain: &'a TokenChain,
        shift: usize,
    },
    /// {p : p earlier occurrence of t[i + 1]} (so p <= i): copy.
    Next(&'a TokenChain),
    Sparse(&'a SparseRows),
}

impl<'a> Targets<'a> {
    /// The target set of `kind`; `chain` must be given for token kinds. None for `Entropy`.
    pub fn of_kind(kind: Kind, chain: Option<&'a TokenChain>) -> Option<Targets<'a>> {
        let chained = |shift| Targets::Chain { chain: chain.expect("token kinds are given a token chain"), shift };
        Some(match kind {
            Kind::PreviousToken => Targets::Offset(1),
            Kind::SelfToken => Targets::Offset(0),
            Kind::Offset(d) => Targets::Offset(d),
            Kind::Bos => Targets::Bos,
            Kind::DuplicateToken => chained(0),
            Kind::Induction => chained(1),
            Kind::Copy => Targets::Next(chain.expect("token kinds are given a token chain")),
            Kind::Entropy => return None,
        })
    }

    /// Calls `visit(j, weight)` for every target key j of query i (all j <= i but for Sparse).
    #[inline]
    pub fn for_each(&self, i: usize, mut visit: impl FnMut(usize, f64)) {
        self.for_each_in_rows(i..i + 1, |_, _| {}, |_, j, w| visit(j, w))
    }

    /// Calls `visit(i, j, weight)` for every query i in `rows` (in increasing order) and target
    /// key j of it, and before row i, `ahead(i + LOOKAHEAD_ROWS, j')` with the first target j' of
    /// that later row, so callers can prefetch scattered entries. The later row may lie past
    /// `rows` (the next block is usually next on the same thread) or even past the matrix: `ahead`
    /// must ignore positions out of range. The kind is matched once per call, so each arm is a
    /// tight loop over rows.
    #[inline]
    pub fn for_each_in_rows(
        &self,
        rows: Range<usize>,
        mut ahead: impl FnMut(usize, usize),
        mut visit: impl FnMut(usize, usize, f64),
    ) {
        match *self {
            Targets::Offset(d) => {
                for i in rows.start.max(d)..rows.end {
                    ahead(i + LOOKAHEAD_ROWS, i + LOOKAHEAD_ROWS - d);
                    visit(i, i - d, 1.0);
                }
            }
            Targets::Bos => rows.clone().for_each(|i| visit(i, 0, 1.0)),
            Targets::Chain { chain, shift } => {
                for i in rows.clone() {
                    let l = i + LOOKAHEAD_ROWS;
                    if let Some(p) = (l < chain.prev.len()).then(|| chain.earlier(l).next()).flatten() {
                        ahead(l, p + shift);
                    }
                    chain.earlier(i).for_each(|p| visit(i, p + shift, 1.0));
                }
            }
            Targets::Next(chain) => {
                let n = chain.prev.len();
                for i in rows.start..rows.end.min(n.saturating_sub(1)) {
                    let l = i + 1 + LOOKAHEAD_ROWS;
                    if let Some(p) = (l < n).then(|| chain.earlier(l).next()).flatten() {
                        ahead(l - 1, p);
                    }
                    chain.earlier(i + 1).for_each(|p| visit(i, p, 1.0));
                }
            }
            Targets::Sparse(sparse) => {
                for i in rows.clone() {
                    let span = sparse.starts[i]..sparse.starts[i + 1];
                    for (&j, &w) in sparse.keys[span.clone()].iter().zip(&sparse.weights[span]) {
                        visit(i, j, w);
                    }
                }
            }
        }
    }
}

/// How many rows ahead `for_each_in_rows` announces targets: enough loads in flight to hide
/// memory latency when every row sits on its own page.
pub const LOOKAHEAD_ROWS: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(t: &Targets, i: usize) -> Vec<usize> {
        let mut v = Vec::new();
        t.for_each(i, |j, _| v.push(j));
        v.sort();
        v
    }

    #[test]
    fn token_kinds_follow_the_table() {
        //            0  1  2  3  4  5
        let tokens = [9, 5, 7, 5, 9, 5];
        let chain = TokenChain::new(&tokens);
        let dup = Targets::of_kind(Kind::DuplicateToken, Some(&chain)).unwrap();
        let ind = Targets::of_kind(Kind::Induction, Some(&chain)).unwrap();
        let copy = Targets::of_kind(Kind::Copy, Some(&chain)).unwrap();
        assert_eq!(collect(&copy, 2), vec![1]); // t[3] = 5 was at 1
        assert!(collect(&copy, 5).is_empty()); // no next token
        assert_eq!(collect(&dup, 5), vec![1, 3]);
        assert_eq!(collect(&ind, 5), vec![2, 4]);
        assert_eq!(collect(&dup, 4), vec![0]);
        assert_eq!(collect(&ind, 4), vec![1]);
        assert!(collect(&dup, 2).is_empty());
        // Brute force over the DESIGN.md definitions.
        for i in 0..tokens.len() {
            let d: Vec<usize> = (0..i).filter(|&j| tokens[j] == tokens[i]).collect();
            let n: Vec<usize> = (1..=i).filter(|&j| tokens[j - 1] == tokens[i] && j - 1 < i).collect();
            assert_eq!(collect(&dup, i), d);
            assert_eq!(collect(&ind, i), n);
            let c: Vec<usize> = (0..=i).filter(|&j| i + 1 < tokens.len() && tokens[j] == tokens[i + 1]).collect();
            assert_eq!(collect(&copy, i), c);
        }
    }

    #[test]
    fn positional_kinds() {
        let prev = Targets::of_kind(Kind::PreviousToken, None).unwrap();
        assert!(collect(&prev, 0).is_empty());
        assert_eq!(collect(&prev, 3), vec![2]);
        assert_eq!(collect(&Targets::of_kind(Kind::Offset(3), None).unwrap(), 5), vec![2]);
        assert_eq!(collect(&Targets::of_kind(Kind::SelfToken, None).unwrap(), 4), vec![4]);
        assert_eq!(collect(&Targets::of_kind(Kind::Bos, None).unwrap(), 4), vec![0]);
    }

    #[test]
    fn kind_names_round_trip_and_reject_unknown() {
        for k in [
            Kind::PreviousToken,
            Kind::DuplicateToken,
            Kind::Induction,
            Kind::Bos,
            Kind::SelfToken,
            Kind::Entropy,
            Kind::Offset(7),
            Kind::Copy,
        ] {
            assert_eq!(k.name().parse::<Kind>().unwrap(), k);
        }
        assert!("offset_+2".parse::<Kind>().is_err() && "offset_03".parse::<Kind>().is_err());
        let err = "inducton".parse::<Kind>().unwrap_err().to_string();
        assert!(err.starts_with("kinds:") && err.contains("\"inducton\""), "{err}");
        assert!(Kind::Offset(4).check_range(4).is_err());
        assert!(Kind::Offset(0).check_range(4).is_err());
        assert!(Kind::Offset(3).check_range(4).is_ok());
    }

    #[test]
    fn sparse_rows_keep_nonzeros_and_reject_nan() {
        let d = ndarray::arr2(&[[0.0, 0.0], [1.0, 0.5]]).into_dyn();
        let d = crate::stack::MatrixStack::new("detection", d.view()).unwrap();
        let rows = SparseRows::from_dense("detection", d.head(0)).unwrap();
        let t = Targets::Sparse(&rows);
        let mut seen = Vec::new();
        t.for_each(1, |j, w| seen.push((j, w)));
        assert_eq!(seen, vec![(0, 1.0), (1, 0.5)]);
        let bad = ndarray::arr2(&[[f64::NAN]]).into_dyn();
        let bad = crate::stack::MatrixStack::new("detection", bad.view()).unwrap();
        assert!(SparseRows::from_dense("detection", bad.head(0)).is_err());
    }
}
