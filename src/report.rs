//! How an error is written for people: one line, its causes joined by ": ".
//! Below every module that logs or returns errors, so any of them can use it.

/// An error and its causes on one line, joined by ": ".
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
