//! Names Schematic accepts: event names and trait keys made of `[a-z0-9_-]`.
//!
//! Segment names are free text ("Order Completed", "Signed Up!!"); Schematic
//! refuses anything outside `[a-z0-9_-]`. Names are snake_cased with `heck`
//! (as Segment's Schematic destination does) and then every other character
//! is dropped, so the same raw name always gives the same Schematic name.

use heck::ToSnakeCase;

/// The Schematic name of a track event, or `None` when nothing acceptable is
/// left (`"!!!"`, a name made only of non-ASCII letters).
pub fn normalize_event_name(raw: &str) -> Option<String> {
    schematic_name(raw)
}

/// The user-trait key for an Engage audience or computed trait; same rule as
/// event names.
pub fn trait_name(key: &str) -> Option<String> {
    schematic_name(key)
}

fn schematic_name(raw: &str) -> Option<String> {
    let snake = raw.to_snake_case();
    let mut out = String::with_capacity(snake.len());
    for c in snake.chars() {
        let accepted = c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
        // Dropping a character can leave two underscores side by side.
        if accepted && !(c == '_' && out.ends_with('_')) {
            out.push(c);
        }
    }
    let trimmed = out.trim_matches(|c| c == '_' || c == '-');
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_from_the_spec() {
        let cases = [
            ("Order Completed", "order_completed"),
            ("orderCompleted", "order_completed"),
            ("Signed Up!!", "signed_up"),
            ("Item #5 Viewed", "item_5_viewed"),
            ("Order-Completed", "order_completed"),
            ("high_value_users", "high_value_users"),
            ("  padded  name ", "padded_name"),
            ("__already__snake__", "already_snake"),
            ("HTTPRequest Sent", "http_request_sent"),
            ("v2.Checkout", "v2_checkout"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_event_name(raw).as_deref(), Some(want), "{raw:?}");
        }
    }

    #[test]
    fn names_with_nothing_acceptable_are_none() {
        for raw in ["", "!!!", "   ", "___", "-", "日本語", "Ωμέγα"] {
            assert_eq!(normalize_event_name(raw), None, "{raw:?}");
        }
    }

    #[test]
    fn non_ascii_letters_are_dropped() {
        assert_eq!(
            normalize_event_name("Café Opened").as_deref(),
            Some("caf_opened")
        );
        assert_eq!(
            normalize_event_name("Größe ändern").as_deref(),
            Some("gre_ndern")
        );
        assert_eq!(
            normalize_event_name("Paid 💰 Plan").as_deref(),
            Some("paid_plan")
        );
    }

    #[test]
    fn output_only_uses_accepted_characters() {
        for raw in ["A b-C_d 9!@#$%^&*()", "ÀÉÎõü x", "a\tb\nc", "--x--"] {
            if let Some(name) = normalize_event_name(raw) {
                assert!(
                    name.chars().all(|c| c.is_ascii_lowercase()
                        || c.is_ascii_digit()
                        || c == '_'
                        || c == '-'),
                    "{raw:?} gave {name:?}"
                );
                assert!(!name.contains("__"), "{raw:?} gave {name:?}");
                assert!(!name.starts_with(['_', '-']) && !name.ends_with(['_', '-']));
            }
        }
    }

    #[test]
    fn trait_names_follow_the_same_rule() {
        assert_eq!(
            trait_name("High Value Users").as_deref(),
            Some("high_value_users")
        );
        assert_eq!(
            trait_name("lifetimeValue").as_deref(),
            Some("lifetime_value")
        );
        assert_eq!(
            trait_name("high_value_users").as_deref(),
            Some("high_value_users")
        );
        assert_eq!(trait_name("?"), None);
    }
}
