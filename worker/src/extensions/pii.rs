//! Finding card numbers and email addresses in step inputs, for the
//! `pii-guard` validator. Only the kind of data and the step are reported.

use serde_json::Value;
use wire::ids::StepId;
use wire::step::StepSpec;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub step_id: StepId,
    /// `a card number` or `an email address`.
    pub kind: &'static str,
}

/// The first step whose input holds a card number or an email address.
pub fn find(steps: &[StepSpec]) -> Option<Found> {
    steps.iter().find_map(|step| {
        // The typed input as JSON: every string in it is checked.
        let input = serde_json::to_value(&step.kind).unwrap_or(Value::Null);
        let mut strings = Vec::new();
        collect_strings(&input, &mut strings);
        let kind = strings.iter().find_map(|s| {
            if has_card_number(s) {
                Some("a card number")
            } else if has_email(s) {
                Some("an email address")
            } else {
                None
            }
        })?;
        Some(Found {
            step_id: step.id.clone(),
            kind,
        })
    })
}

fn collect_strings<'a>(value: &'a Value, into: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => into.push(s),
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, into)),
        Value::Object(map) => map.iter().for_each(|(k, v)| {
            into.push(k);
            collect_strings(v, into);
        }),
        _ => {}
    }
}

/// 13 to 19 digits, optionally grouped by spaces or dashes, passing the Luhn check.
pub fn has_card_number(text: &str) -> bool {
    // Runs of digits, where single spaces or dashes between digits do not break a run.
    let mut digits: Vec<u8> = Vec::new();
    let mut runs: Vec<Vec<u8>> = Vec::new();
    let mut last_sep = false;
    for c in text.chars() {
        if let Some(d) = c.to_digit(10) {
            digits.push(d as u8);
            last_sep = false;
        } else if (c == ' ' || c == '-') && !digits.is_empty() && !last_sep {
            last_sep = true;
        } else {
            if !digits.is_empty() {
                runs.push(std::mem::take(&mut digits));
            }
            last_sep = false;
        }
    }
    if !digits.is_empty() {
        runs.push(digits);
    }
    runs.iter()
        .any(|run| (13..=19).contains(&run.len()) && luhn(run))
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

/// `local@domain.tld` somewhere in the text.
pub fn has_email(text: &str) -> bool {
    text.split(|c: char| {
        c.is_whitespace() || matches!(c, '<' | '>' | '"' | '\'' | ',' | ';' | '(' | ')')
    })
    .any(|token| {
        let Some((local, domain)) = token.split_once('@') else {
            return false;
        };
        let domain = domain.trim_end_matches('.');
        !local.is_empty()
            && local
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._%+-".contains(c))
            && domain.contains('.')
            && domain.split('.').all(|label| {
                !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::step::{StepKind, StepSpec};

    #[test]
    fn card_numbers_are_found_with_or_without_grouping() {
        assert!(has_card_number("pay 4111 1111 1111 1111 now"));
        assert!(has_card_number("4111-1111-1111-1111"));
        assert!(has_card_number("card=5500005555555559"));
        assert!(!has_card_number("4111 1111 1111 1112"), "fails Luhn");
        assert!(!has_card_number("order 12345"));
        assert!(!has_card_number("2026-01-01"));
    }

    #[test]
    fn emails_are_found() {
        assert!(has_email("contact alice@example.com please"));
        assert!(has_email("<bob.smith+x@mail.example.org>"));
        assert!(!has_email("no at sign here"));
        assert!(!has_email("user@localhost"));
        assert!(!has_email("@example.com"));
    }

    fn step(id: &str, kind: StepKind) -> StepSpec {
        StepSpec {
            id: StepId::parse(id).expect("id"),
            kind,
            retry: Default::default(),
        }
    }

    #[test]
    fn the_first_offending_step_is_named() {
        let steps = vec![
            step("a", StepKind::Noop),
            step(
                "b",
                StepKind::Fail(wire::step::FailInput {
                    message: "mail carol@example.net".to_owned(),
                    probability: 1.0,
                }),
            ),
        ];
        assert_eq!(
            find(&steps),
            Some(Found {
                step_id: StepId::parse("b").expect("id"),
                kind: "an email address"
            })
        );
        assert_eq!(find(&steps[..1]), None);
    }
}
