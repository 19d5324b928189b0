//! Errors as one line of text, where a typed error leaves the process: an API answer's
//! `error` field, a log line, a CLI's exit message. Inside the daemons errors stay typed.

/// An error and its causes on one line, `outer: cause: cause`. A cause whose text the line
/// already holds (an error that repeats its source in its message) is not written twice.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("opening the volume")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_follow_the_error() {
        let e = Outer(std::io::Error::other("disk gone"));
        assert_eq!(chain(&e), "opening the volume: disk gone");
    }
}
