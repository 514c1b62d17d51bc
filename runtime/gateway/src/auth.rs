//! Auth wiring: the config's `broker.auth`/`broker.acl` as broker settings (loading the
//! password file), and `edgegw passwd`.

use std::{
    io::{BufRead as _, IsTerminal as _},
    path::Path,
    sync::Arc,
};

use anyhow::{Context as _, bail};
use edgegw_broker::{
    AclAction, AclRule, AclSettings, AuthSettings, PasswordFile, PasswordFileError, Permission,
    Selector, auth,
};
use edgegw_config::{AclAction as ConfigAction, AclPermission, Config};

/// The broker's auth settings from a validated config; reads the password file.
pub fn broker_auth(config: &Config) -> Result<AuthSettings, PasswordFileError> {
    let auth = &config.broker.auth;
    let passwords = match &auth.password_file {
        Some(path) => Some(Arc::new(PasswordFile::load(path)?)),
        None => None,
    };
    let permission = |p: AclPermission| match p {
        AclPermission::Allow => Permission::Allow,
        AclPermission::Deny => Permission::Deny,
    };
    let selector = |value: &Option<String>| {
        value.as_ref().map(|v| match v.as_str() {
            "*" => Selector::Any,
            name => Selector::Exact(name.to_string()),
        })
    };
    let acl = &config.broker.acl;
    Ok(AuthSettings {
        allow_anonymous: auth.allow_anonymous,
        passwords,
        max_failures: auth.max_failures,
        failure_window: auth.failure_window.as_std(),
        acl: AclSettings {
            default: permission(acl.default),
            rules: acl
                .rules
                .iter()
                .map(|rule| AclRule {
                    permission: permission(rule.permission),
                    action: match rule.action {
                        ConfigAction::Publish => AclAction::Publish,
                        ConfigAction::Subscribe => AclAction::Subscribe,
                        ConfigAction::All => AclAction::All,
                    },
                    user: selector(&rule.user),
                    client_id: selector(&rule.client_id),
                    topics: rule.topics.clone(),
                })
                .collect(),
        },
    })
}

/// The number of problems a password-file error reports (for "N problems found").
pub fn problem_count(error: &PasswordFileError) -> usize {
    match error {
        PasswordFileError::Invalid { problems, .. } => problems.len(),
        _ => 1,
    }
}

/// `edgegw passwd FILE USER`.
pub fn passwd(file: &Path, user: &str) -> anyhow::Result<()> {
    auth::password::check_user_name(user)
        .map_err(|reason| anyhow::anyhow!("user name {user:?} {reason}"))?;
    let password = read_password()?;
    let outcome = auth::set_password(file, user, password.as_bytes())
        .with_context(|| format!("cannot set the password of `{user}`"))?;
    let verb = match outcome {
        auth::Update::Added => "added",
        auth::Update::Replaced => "updated",
    };
    println!(
        "{verb} user `{user}` in {}; the broker reads it at start",
        file.display()
    );
    Ok(())
}

/// One line from standard input when it is not a terminal, else a twice-typed prompt.
fn read_password() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    let password = if stdin.is_terminal() {
        let first = rpassword::prompt_password("Password: ").context("cannot read a password")?;
        let second =
            rpassword::prompt_password("Repeat password: ").context("cannot read a password")?;
        if first != second {
            bail!("the passwords do not match; nothing changed");
        }
        first
    } else {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        if line.is_empty() {
            bail!(
                "no password on standard input: pipe one line, e.g. `printf '%s\\n' \"$PW\" | edgegw passwd FILE USER`"
            );
        }
        let trimmed = line.strip_suffix('\n').unwrap_or(&line);
        trimmed.strip_suffix('\r').unwrap_or(trimmed).to_string()
    };
    if password.is_empty() {
        bail!("the password is empty; nothing changed");
    }
    Ok(password)
}
