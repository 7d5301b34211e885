//! `macula signup`, `login`, `logout`, `account`: the caller's account on a registry.

#[allow(unused_imports)]
use super::*;

pub(crate) fn read_password(stdin: bool, confirm: bool) -> Result<String> {
    if let Ok(p) = std::env::var("MACULA_PASSWORD") {
        return Ok(p);
    }
    if stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    if !std::io::stdin().is_terminal() {
        bail!("no terminal to ask for the password: pass --password-stdin or set MACULA_PASSWORD");
    }
    let p = rpassword::prompt_password("Password: ")?;
    if confirm && rpassword::prompt_password("Again: ")? != p {
        bail!("the passwords differ");
    }
    Ok(p)
}

/// `macula account ...`: the logged-in account and its email address.
#[derive(clap::Subcommand)]
pub enum AccountCmd {
    /// Show the account you are logged in as (email, whether it is verified, operator).
    Show(Server),
    /// Verify your email address with the code mailed to it: `macula account verify ev_…`.
    Verify {
        /// The code from the mail.
        code: String,
        #[command(flatten)]
        server: Server,
    },
    /// Mail a new verification code to your address (one a minute).
    Resend(Server),
    /// Change your address: a code goes to the new one; the change happens when you verify it.
    Email {
        /// The new address.
        new_email: String,
        /// Read the password from the first line of stdin instead of prompting.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        server: Server,
    },
}

pub fn account(cmd: AccountCmd, json: bool) -> Result<()> {
    match cmd {
        AccountCmd::Show(server) => {
            let v: Account = Api::new(&server)?.get("GET", "/v1/account")?;
            emit(json, &v, |v| {
                println!(
                    "{} ({}){}",
                    v.email,
                    if v.email_verified {
                        "verified"
                    } else {
                        "not verified: macula account verify CODE"
                    },
                    if v.operator { ", operator" } else { "" }
                )
            });
        }
        AccountCmd::Verify { code, server } => {
            let v: VerifiedEmail = Api::new(&server)?.call_anonymous(
                "POST",
                "/v1/account/verify",
                &VerifyCode { code },
            )?;
            emit(json, &v, |v| println!("{} is verified.", v.email));
        }
        AccountCmd::Resend(server) => {
            let v: Verification = Api::new(&server)?.get("POST", "/v1/account/verification")?;
            emit(json, &v, |v| {
                println!(
                    "A new code was mailed to {}.",
                    v.to.as_deref().unwrap_or("your address")
                )
            });
        }
        AccountCmd::Email {
            new_email,
            password_stdin,
            server,
        } => {
            let api = Api::new(&server)?;
            let password = read_password(password_stdin, false)?;
            let v: PendingEmail = api.call(
                "PUT",
                "/v1/account/email",
                &EmailChange {
                    email: new_email.clone(),
                    password,
                },
            )?;
            emit(json, &v, |_| {
                println!(
                    "A code was mailed to {new_email}; your address changes when you run `macula account verify CODE`."
                )
            });
        }
    }
    Ok(())
}

pub fn signup(a: AccountArgs, json: bool) -> Result<()> {
    let api = Api::new(&a.server)?;
    let password = read_password(a.password_stdin, true)?;
    let v: NewAccount = api.call_anonymous(
        "POST",
        "/v1/accounts",
        &Credentials {
            email: a.email.clone(),
            password,
            client: None,
        },
    )?;
    emit(json, &v, |v| {
        println!(
            "Created account {} on {}. Log in with: macula login --email {}",
            v.email, api.base, a.email
        );
        if v.verification.sent {
            println!(
                "A verification code was mailed to {}: verify with `macula account verify CODE`\n\
                 (until then, invitations to that address and operator rights for it do not apply).",
                a.email
            );
        } else {
            println!(
                "The verification mail could not be sent; once logged in, ask again with `macula account resend`."
            );
        }
    });
    Ok(())
}

pub fn login(a: AccountArgs, json: bool) -> Result<()> {
    let api = Api::new(&a.server)?;
    let password = read_password(a.password_stdin, false)?;
    let v: Session = api.call_anonymous(
        "POST",
        "/v1/sessions",
        &Credentials {
            email: a.email.clone(),
            password,
            client: Some("macula-cli".into()),
        },
    )?;
    let cred = Credential {
        server: api.base.clone(),
        email: v.email.clone(),
        token: v.token.clone(),
        ca: api
            .ca
            .as_ref()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
    };
    let path = credentials_path();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    macula_node::confdir::write_secret(&path, &serde_json::to_string_pretty(&cred)?)?;
    if json {
        println!(
            "{}",
            json!({"server": cred.server, "email": cred.email, "expires_at": v.expires_at})
        );
    } else {
        println!(
            "Logged in to {} as {} (until {}). Credential saved to {}.",
            cred.server,
            cred.email,
            v.expires_at,
            path.display()
        );
    }
    Ok(())
}

pub fn logout(server: Server, json: bool) -> Result<()> {
    let api = Api::new(&server)?;
    let path = credentials_path();
    if api.token.is_none() {
        if json {
            println!("{}", json!({"logged_out": false}));
        } else {
            println!("Not logged in to {}.", api.base);
        }
        return Ok(());
    }
    // End the session on the server too; a registry that is gone must not keep us logged in.
    if let Err(e) = api.send("DELETE", "/v1/sessions/current", None, true) {
        eprintln!("warning: the registry did not confirm the logout ({e}); the local credential is removed anyway");
    }
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    if json {
        println!("{}", json!({"logged_out": true}));
    } else {
        println!("Logged out of {}.", api.base);
    }
    Ok(())
}
