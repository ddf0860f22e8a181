//! Desktop notifications for messages that arrive while the window is not being looked
//! at: through the freedesktop notification service on D-Bus (`notify-rust`), sent from a
//! blocking worker so a slow or missing notification daemon never stalls the window.

/// What a notification says: the sender, and a preview of the text unless the user
/// turned previews off in the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub summary: String,
    pub body: String,
}

impl Notice {
    /// The notice for a message from `from`: `text`'s first line (at most 100
    /// characters) when `preview`, else only that there is a message.
    pub fn message(from: &str, text: &str, preview: bool) -> Self {
        let body = if preview {
            let line = text.lines().next().unwrap_or("");
            let mut shown: String = line.chars().take(100).collect();
            if shown.len() < line.len() || text.lines().nth(1).is_some() {
                shown.push('…');
            }
            shown
        } else {
            "New message".to_owned()
        };
        Self {
            summary: from.to_owned(),
            body,
        }
    }
}

/// Shows `notice` without waiting for it; a failure (no notification daemon, no D-Bus
/// session) is logged at debug level and otherwise ignored.
pub fn show(runtime: &tokio::runtime::Handle, notice: Notice) {
    runtime.spawn_blocking(move || {
        let result = notify_rust::Notification::new()
            .appname("Secure Chat")
            .summary(&notice.summary)
            .body(&notice.body)
            .show();
        if let Err(e) = result {
            tracing::debug!("desktop notification not shown: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::Notice;

    #[test]
    fn previews_are_one_short_line_or_nothing() {
        assert_eq!(
            Notice::message("bob", "hi there", true),
            Notice {
                summary: "bob".into(),
                body: "hi there".into()
            }
        );
        assert_eq!(Notice::message("bob", "first\nsecond", true).body, "first…");
        assert_eq!(
            Notice::message("bob", &"x".repeat(300), true)
                .body
                .chars()
                .count(),
            101
        );
        assert_eq!(Notice::message("bob", "secret", false).body, "New message");
    }
}
