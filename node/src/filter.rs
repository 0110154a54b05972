//! Sensitive-word filter: one Aho-Corasick automaton over a configured word list, case-insensitive,
//! masking matches with `*` (one per character) or rejecting the message.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

use crate::config::FilterMode;
use crate::error::{Error, Result};

/// Outcome of filtering one text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No match: the text as given.
    Clean,
    /// Matches were masked: the new text.
    Masked(String),
    /// Reject mode and a match was found.
    Rejected,
}

/// A compiled word filter.
#[derive(Debug, Clone)]
pub struct WordFilter {
    automaton: Option<AhoCorasick>,
    mode: FilterMode,
}

impl WordFilter {
    pub fn new(words: &[String], mode: FilterMode) -> Result<Self> {
        let automaton = if words.is_empty() {
            None
        } else {
            Some(
                AhoCorasickBuilder::new()
                    .ascii_case_insensitive(true)
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(words)
                    .map_err(|e| Error::Config(format!("field `filter.words`: {e}")))?,
            )
        };
        Ok(WordFilter { automaton, mode })
    }

    pub fn check(&self, text: &str) -> Verdict {
        let Some(ac) = &self.automaton else { return Verdict::Clean };
        let mut out = String::new();
        let mut last = 0;
        for m in ac.find_iter(text) {
            if self.mode == FilterMode::Reject {
                return Verdict::Rejected;
            }
            out.push_str(&text[last..m.start()]);
            out.extend(std::iter::repeat_n('*', text[m.start()..m.end()].chars().count()));
            last = m.end();
        }
        if last == 0 {
            return Verdict::Clean;
        }
        out.push_str(&text[last..]);
        Verdict::Masked(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(mode: FilterMode) -> WordFilter {
        WordFilter::new(&["badword".into(), "傻瓜".into()], mode).unwrap()
    }

    #[test]
    fn masks_case_insensitively_and_counts_characters_not_bytes() {
        assert_eq!(f(FilterMode::Mask).check("a BadWord and 傻瓜!"), Verdict::Masked("a ******* and **!".into()));
        assert_eq!(f(FilterMode::Mask).check("hello"), Verdict::Clean);
    }

    #[test]
    fn reject_mode_rejects_any_match() {
        assert_eq!(f(FilterMode::Reject).check("xx badword"), Verdict::Rejected);
        assert_eq!(f(FilterMode::Reject).check("fine"), Verdict::Clean);
    }

    #[test]
    fn empty_list_passes_everything() {
        assert_eq!(WordFilter::new(&[], FilterMode::Reject).unwrap().check("badword"), Verdict::Clean);
    }
}
