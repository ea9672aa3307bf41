//! PromQL scanning for the alert checks: the identifiers and label values an expression uses,
//! bracket balance, durations.

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Identifiers in a PromQL expression outside string literals (metric and function names,
/// label names, keywords).
pub fn identifiers(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut in_range = false;
    for ch in expr.chars() {
        if let Some(q) = quote {
            if ch == q {
                quote = None;
            }
            continue;
        }
        if in_range {
            in_range = ch != ']';
            continue;
        }
        // `0.9`: a dot inside a number is part of it.
        if is_ident(ch) || (ch == '.' && cur.starts_with(|c: char| c.is_ascii_digit())) {
            cur.push(ch);
            continue;
        }
        if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        match ch {
            '"' | '\'' | '`' => quote = Some(ch),
            '[' => in_range = true,
            _ => {}
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Values a label is matched against: `label="v"` and `label=~"a|b"`.
pub fn label_values(expr: &str, label: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find(label) {
        let before = rest[..i].chars().next_back();
        let after = &rest[i + label.len()..];
        rest = after;
        if before.is_some_and(is_ident) {
            continue;
        }
        let after = after.trim_start();
        let (regex, after) = match after.strip_prefix("=~") {
            Some(a) => (true, a),
            None => match after.strip_prefix('=') {
                Some(a) if !a.starts_with('=') => (false, a),
                _ => continue,
            },
        };
        let after = after.trim_start();
        let Some(body) = after.strip_prefix('"') else {
            continue;
        };
        let value = &body[..body.find('"').expect("closing quote")];
        if regex {
            out.extend(value.split('|').map(str::to_string));
        } else {
            out.push(value.to_string());
        }
    }
    out
}

pub fn balanced(s: &str, open: char, close: char) -> bool {
    let mut depth = 0i32;
    for ch in s.chars() {
        if ch == open {
            depth += 1;
        } else if ch == close {
            depth -= 1;
            if depth < 0 {
                return false;
            }
        }
    }
    depth == 0
}

pub fn is_duration(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "s", "m", "h", "d", "w", "y"]
            .into_iter()
            .find(|u| rest.starts_with(u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

/// PromQL keywords and functions that may appear as identifiers in the rules.
pub const PROMQL_WORDS: [&str; 21] = [
    "and",
    "or",
    "unless",
    "on",
    "ignoring",
    "by",
    "without",
    "group_left",
    "group_right",
    "bool",
    "sum",
    "max",
    "min",
    "count",
    "avg",
    "rate",
    "increase",
    "histogram_quantile",
    "time",
    "absent",
    "offset",
];
