//! Outgoing mail (email verification, for now) behind one interface, [`Mailer`], with three
//! senders chosen by `registry.mail.url`:
//!
//! - empty: [`LogMailer`] writes each message to the log (what `macula up` uses: the code to
//!   verify an address appears in its output);
//! - `smtp://…`, `smtps://…`: [`SmtpMailer`], a real SMTP client (lettre) — `smtps://` is SMTP
//!   over TLS, `smtp://…?tls=required` STARTTLS, plain `smtp://` only for a relay on this
//!   machine or a test sink;
//! - `dir:PATH`: [`DirMailer`], each message as an `.eml` file in a directory (for operators who
//!   hand mail to another system, and for tests).

use std::path::PathBuf;

use futures_util::future::BoxFuture;
use lettre::message::{header::ContentType, Mailbox};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// One message to one recipient, plain text.
#[derive(Debug, Clone)]
pub struct Mail {
    pub to: String,
    pub subject: String,
    pub body: String,
}

/// Sends mail. A failure is reported to the caller, which decides whether the request fails.
pub trait Mailer: Send + Sync {
    fn send(&self, mail: Mail) -> BoxFuture<'static, Result<(), String>>;
    /// How mail goes out (`log`, `smtp`, `dir`), for answers and warnings.
    fn kind(&self) -> &'static str;
}

/// `registry.mail` settings.
#[derive(Debug, Clone, Default)]
pub struct MailConfig {
    /// Empty (log), `smtp://…`, `smtps://…` or `dir:PATH`.
    pub url: String,
    /// The sender, e.g. `Macula <noreply@example.com>`.
    pub from: String,
}

/// The mailer `config` describes.
pub fn from_config(config: &MailConfig) -> anyhow::Result<Box<dyn Mailer>> {
    let from: Mailbox = if config.from.is_empty() {
        "Macula <noreply@localhost>".parse()?
    } else {
        config.from.parse().map_err(|e| {
            anyhow::anyhow!(
                "registry.mail.from {:?} is not an address: {e}",
                config.from
            )
        })?
    };
    let url = config.url.trim();
    if url.is_empty() {
        return Ok(Box::new(LogMailer));
    }
    if let Some(dir) = url.strip_prefix("dir:") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("registry.mail.url: creating {}: {e}", dir.display()))?;
        return Ok(Box::new(DirMailer { dir, from }));
    }
    if url.starts_with("smtp://") || url.starts_with("smtps://") {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| anyhow::anyhow!("registry.mail.url: {e}"))?
            .timeout(Some(std::time::Duration::from_secs(20)))
            .build();
        return Ok(Box::new(SmtpMailer { transport, from }));
    }
    anyhow::bail!("registry.mail.url must be empty (log), smtp://…, smtps://… or dir:PATH")
}

fn message(from: &Mailbox, mail: &Mail) -> Result<Message, String> {
    let to: Mailbox = mail
        .to
        .parse()
        .map_err(|e| format!("{} is not an address: {e}", mail.to))?;
    Message::builder()
        .from(from.clone())
        .to(to)
        .subject(&mail.subject)
        .header(ContentType::TEXT_PLAIN)
        .body(mail.body.clone())
        .map_err(|e| e.to_string())
}

/// Writes messages to the log.
pub struct LogMailer;

impl Mailer for LogMailer {
    fn send(&self, mail: Mail) -> BoxFuture<'static, Result<(), String>> {
        tracing::info!(target: "macula::mail", "mail to {} — {}\n{}", mail.to, mail.subject, mail.body);
        Box::pin(async { Ok(()) })
    }

    fn kind(&self) -> &'static str {
        "log"
    }
}

/// Sends through an SMTP server.
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer for SmtpMailer {
    fn send(&self, mail: Mail) -> BoxFuture<'static, Result<(), String>> {
        let transport = self.transport.clone();
        let msg = message(&self.from, &mail);
        Box::pin(async move {
            transport
                .send(msg?)
                .await
                .map(|_| ())
                .map_err(|e| format!("sending mail to {}: {e}", mail.to))
        })
    }

    fn kind(&self) -> &'static str {
        "smtp"
    }
}

/// Writes each message as `<unix-nanos>-<recipient>.eml` in a directory.
pub struct DirMailer {
    dir: PathBuf,
    from: Mailbox,
}

impl Mailer for DirMailer {
    fn send(&self, mail: Mail) -> BoxFuture<'static, Result<(), String>> {
        let msg = message(&self.from, &mail);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let safe: String = mail
            .to
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '@' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = self.dir.join(format!("{nanos}-{safe}.eml"));
        Box::pin(async move {
            // Mail holds codes that prove an address: readable by this user only.
            let bytes = msg?.formatted();
            tokio::task::spawn_blocking(move || {
                macula_common::secret::write_secret(&path, &String::from_utf8_lossy(&bytes))
                    .map_err(|e| format!("{e:#}"))
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }

    fn kind(&self) -> &'static str {
        "dir"
    }
}
