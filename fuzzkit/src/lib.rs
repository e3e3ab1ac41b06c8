//! What Carapace's property ("fuzz") tests of parsers of peer bytes share. A dev-dependency
//! only: linking this crate installs a counting global allocator.
//!
//! - [`config`]: the proptest settings, with the case count from `CARAPACE_FUZZ_CASES`
//!   (each target's own default otherwise, so CI stays bounded in time) and no failure
//!   files written into the source tree: a failing input found here becomes a named unit
//!   test next to its parser. Under `CI=true` the inputs come from a fixed seed
//!   ([`CI_SEED`]), so a landing is judged on the same inputs every time; everywhere else
//!   the seed is random and each run explores new inputs (`PROPTEST_RNG_SEED` overrides
//!   both);
//! - [`mutated`] / [`mutated_text`]: structure-aware inputs, a real sample with a few byte
//!   flips, overwrites, insertions, deletions, duplications or a truncation, so the
//!   generated inputs get past the first length or magic check;
//! - [`bounded`]: runs a parse and asserts it allocated at most [`ALLOCATION_BOUND`] bytes
//!   at any moment (plus [`ALLOCATION_PER_INPUT_BYTE`] per input byte), on this thread:
//!   a declared length that is trusted before it is checked shows up here, not as an
//!   out-of-memory kill in production.
//!
//! Run the targets longer locally with, for example,
//! `CARAPACE_FUZZ_CASES=100000 cargo test -p carapace-core fuzz`.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

pub use proptest;

/// The environment variable that sets every target's case count.
pub const CASES_ENV: &str = "CARAPACE_FUZZ_CASES";

/// The most a parse may hold allocated at one time, before [`ALLOCATION_PER_INPUT_BYTE`].
pub const ALLOCATION_BOUND: u64 = 4 << 20;

/// What a parse may allocate per byte of input on top of [`ALLOCATION_BOUND`] (parsers
/// copy, decode and build trees of their input).
pub const ALLOCATION_PER_INPUT_BYTE: u64 = 64;

/// The case count: `CARAPACE_FUZZ_CASES` when set to a number, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var(CASES_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The seed CI generates inputs from (see the crate documentation).
pub const CI_SEED: u64 = 0x4341_5241_5041_4345;

/// proptest settings for a target whose default case count is `default_cases`.
pub fn config(default_cases: u32) -> Config {
    let defaults = Config::default();
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let seed_given = std::env::var_os("PROPTEST_RNG_SEED").is_some();
    Config {
        cases: cases(default_cases),
        failure_persistence: None,
        rng_seed: if in_ci && !seed_given {
            RngSeed::Fixed(CI_SEED)
        } else {
            defaults.rng_seed
        },
        ..defaults
    }
}

/// Runs `parse` on an input of `input_len` bytes and asserts that it held at most
/// [`ALLOCATION_BOUND`] + [`ALLOCATION_PER_INPUT_BYTE`] × `input_len` bytes allocated at
/// any moment (on this thread). Returns what `parse` returned.
///
/// A panic in `parse` is caught inside the measurement and resumed after it, so that the
/// counter's nesting stays balanced (it has no unwind guard of its own) and proptest can
/// shrink the failing input.
pub fn bounded<T>(what: &str, input_len: usize, parse: impl FnOnce() -> T) -> T {
    let mut out = None;
    let info = allocation_counter::measure(|| {
        out = Some(std::panic::catch_unwind(std::panic::AssertUnwindSafe(
            parse,
        )));
    });
    let value = match out {
        Some(Ok(v)) => v,
        Some(Err(panic)) => std::panic::resume_unwind(panic),
        None => unreachable!("measure runs its closure exactly once"),
    };
    let limit = ALLOCATION_BOUND + ALLOCATION_PER_INPUT_BYTE * input_len as u64;
    assert!(
        info.bytes_max <= limit,
        "{what}: parsing {input_len} bytes held {} bytes allocated at once (limit {limit})",
        info.bytes_max
    );
    value
}

/// One edit of a byte string; positions are taken modulo the length.
#[derive(Debug, Clone)]
enum Edit {
    /// XOR one byte with a non-zero mask.
    Flip(usize, u8),
    /// Overwrite one byte.
    Set(usize, u8),
    /// Toggle the case of an ASCII letter at or after a position (case rules: trust
    /// domains, hex IDs, realms).
    Case(usize),
    /// Insert bytes.
    Insert(usize, Vec<u8>),
    /// Remove up to `n` bytes.
    Remove(usize, usize),
    /// Repeat a range in place.
    Duplicate(usize, usize),
    /// Cut the input short.
    Truncate(usize),
    /// Overwrite four bytes with an interesting 32-bit value (both byte orders occur).
    Word(usize, [u8; 4]),
    /// Overwrite the aligned four bytes at a position, and every other aligned four
    /// bytes equal to them, with an interesting value: a count and the copy of it that
    /// a format repeats (NDR's conformant max count) change together.
    Inflate(usize, [u8; 4]),
}

fn edit() -> impl Strategy<Value = Edit> {
    let interesting = prop_oneof![
        Just(0u32),
        Just(1),
        Just(0x7f),
        Just(0x80),
        Just(0xff),
        Just(0xffff),
        Just(0x7fff_ffff),
        Just(0x8000_0000),
        Just(u32::MAX),
        // Counts and lengths of every magnitude: a trusted one allocates this much.
        (8..31u32).prop_map(|bits| 1 << bits),
        any::<u32>(),
    ];
    prop_oneof![
        3 => (any::<usize>(), 1..=255u8).prop_map(|(at, m)| Edit::Flip(at, m)),
        3 => (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Set(at, b)),
        2 => any::<usize>().prop_map(Edit::Case),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, b)| Edit::Insert(at, b)),
        1 => (any::<usize>(), 1..16usize).prop_map(|(at, n)| Edit::Remove(at, n)),
        1 => (any::<usize>(), 1..32usize).prop_map(|(at, n)| Edit::Duplicate(at, n)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        2 => (any::<usize>(), interesting.clone(), any::<bool>()).prop_map(|(at, v, le)| {
            Edit::Word(at, if le { v.to_le_bytes() } else { v.to_be_bytes() })
        }),
        1 => (any::<usize>(), interesting, any::<bool>()).prop_map(|(at, v, le)| {
            Edit::Inflate(at, if le { v.to_le_bytes() } else { v.to_be_bytes() })
        }),
    ]
}

fn apply(buf: &mut Vec<u8>, edit: &Edit) {
    let len = buf.len();
    let at = |i: usize| if len == 0 { 0 } else { i % len };
    match edit {
        Edit::Flip(i, m) if len > 0 => buf[at(*i)] ^= m,
        Edit::Set(i, b) if len > 0 => buf[at(*i)] = *b,
        Edit::Case(i) if len > 0 => {
            let start = at(*i);
            if let Some(pos) = (start..len)
                .chain(0..start)
                .find(|&p| buf[p].is_ascii_alphabetic())
            {
                buf[pos] ^= 0x20;
            }
        }
        Edit::Insert(i, bytes) => {
            let at = if len == 0 { 0 } else { i % (len + 1) };
            buf.splice(at..at, bytes.iter().copied());
        }
        Edit::Remove(i, n) if len > 0 => {
            let start = at(*i);
            let end = (start + n).min(len);
            buf.drain(start..end);
        }
        Edit::Duplicate(i, n) if len > 0 => {
            let start = at(*i);
            let end = (start + n).min(len);
            let copy = buf[start..end].to_vec();
            buf.splice(end..end, copy);
        }
        Edit::Truncate(i) if len > 0 => buf.truncate(i % len),
        Edit::Word(i, w) if len >= 4 => {
            // Half the time 4-aligned: where binary formats keep their counts.
            let start = if i % 2 == 0 {
                (i / 2) % (len / 4) * 4
            } else {
                i % (len - 3)
            };
            buf[start..start + 4].copy_from_slice(w);
        }
        Edit::Inflate(i, w) if len >= 4 => {
            let slots = len / 4;
            let start = i % slots * 4;
            let old: [u8; 4] = [buf[start], buf[start + 1], buf[start + 2], buf[start + 3]];
            for slot in 0..slots {
                if buf[slot * 4..slot * 4 + 4] == old {
                    buf[slot * 4..slot * 4 + 4].copy_from_slice(w);
                }
            }
        }
        _ => {}
    }
}

/// One of `seeds` with 1 to 4 random edits (one seed in eight is left as it is, so
/// the valid path is exercised too).
pub fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    assert!(!seeds.is_empty(), "mutated() needs at least one seed");
    let n = seeds.len();
    (0..n, proptest::collection::vec(edit(), 1..=4), 0..8u8).prop_map(move |(i, edits, keep)| {
        let mut buf = seeds[i].clone();
        if keep != 0 {
            for e in &edits {
                apply(&mut buf, e);
            }
        }
        buf
    })
}

/// [`mutated`] for text: the edited bytes as UTF-8, invalid sequences replaced.
pub fn mutated_text(seeds: Vec<String>) -> impl Strategy<Value = String> {
    mutated(seeds.into_iter().map(String::into_bytes).collect())
        .prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Arbitrary bytes, up to `max_len`.
pub fn bytes(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=max_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    #[test]
    fn bounded_catches_a_large_allocation() {
        let small = bounded("small", 10, || vec![0u8; 1000].len());
        assert_eq!(small, 1000);
        let caught =
            std::panic::catch_unwind(|| bounded("large", 10, || vec![0u8; 64 << 20].len()));
        let message = caught.expect_err("a 64 MiB allocation is over the bound");
        let text = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(text.contains("large: parsing 10 bytes held"), "{text}");
    }

    #[test]
    fn bounded_passes_panics_on_and_keeps_working_after_many() {
        for i in 0..200 {
            let caught = std::panic::catch_unwind(|| {
                bounded("panicky", 1, || {
                    if i >= 0 {
                        panic!("parser bug {i}");
                    }
                })
            });
            let message = caught.expect_err("the panic is passed on");
            let text = message
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_default();
            assert_eq!(text, format!("parser bug {i}"));
        }
        assert_eq!(bounded("after", 1, || vec![1u8; 100].len()), 100);
    }

    #[test]
    fn mutations_change_the_seed_most_of_the_time() {
        let seed = b"spiffe://example.org/workload".to_vec();
        let strategy = mutated(vec![seed.clone()]);
        let mut runner = TestRunner::deterministic();
        let mut changed = 0;
        for _ in 0..200 {
            let v = strategy.new_tree(&mut runner).unwrap().current();
            if v != seed {
                changed += 1;
            }
        }
        assert!(changed > 120, "{changed} of 200 changed");
    }

    #[test]
    fn the_case_count_is_the_default_without_the_variable() {
        if std::env::var_os(CASES_ENV).is_none() {
            assert_eq!(cases(77), 77);
            assert_eq!(config(77).cases, 77);
        }
    }
}
