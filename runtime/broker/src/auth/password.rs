//! The password file: one `user:PHC-string` line per user, argon2id hashes only.
//!
//! ```text
//! # edgegw passwd /etc/edgegw/passwd alice
//! alice:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA
//! ```
//!
//! Blank lines and lines starting with `#` are ignored. A user name is everything before
//! the first `:`; it must be non-empty and free of control characters. The file is read
//! once at start; every bad line is reported with its number. Verification uses the
//! parameters stored in each hash, so hashes made with other costs keep working.

use std::{
    collections::HashMap,
    fmt, io,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};

/// A problem on one line of a password file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineProblem {
    pub line: usize,
    pub message: String,
}

/// Errors reading, checking or writing a password file.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    #[error("{}: cannot read the password file: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    #[error("{}", Problems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<LineProblem>,
    },
    #[error("{}: cannot write the password file: {error}", path.display())]
    Write { path: PathBuf, error: io::Error },
    #[error("user name {name:?} {reason}")]
    UserName { name: String, reason: &'static str },
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// `file:line: message` for each problem, one per line (like config errors).
struct Problems<'a>(&'a Path, &'a [LineProblem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.1.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}: {}",
                self.0.display(),
                problem.line,
                problem.message
            )?;
        }
        Ok(())
    }
}

/// The outcome of checking one user's password.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    WrongPassword,
    UnknownUser,
}

/// The users of a password file with their parsed hashes. Never holds a plaintext.
pub struct PasswordFile {
    users: HashMap<String, PasswordHash>,
}

impl fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordFile")
            .field("users", &self.users.len())
            .finish()
    }
}

impl PasswordFile {
    /// Reads and checks a password file.
    pub fn load(path: &Path) -> Result<Self, PasswordFileError> {
        let text = std::fs::read_to_string(path).map_err(|error| PasswordFileError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(&text).map_err(|problems| PasswordFileError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }

    /// Parses password-file text, reporting every bad line.
    pub fn parse(text: &str) -> Result<Self, Vec<LineProblem>> {
        let mut users = HashMap::new();
        let mut first_line = HashMap::new();
        let mut problems = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let mut problem = |message: String| {
                problems.push(LineProblem {
                    line: number,
                    message,
                })
            };
            let Some((user, phc)) = entry(line) else {
                continue;
            };
            let Some(phc) = phc else {
                problem(format!(
                    "expected `user:hash`, got {:?}; add users with `edgegw passwd FILE USER`",
                    truncate(line)
                ));
                continue;
            };
            if let Err(reason) = check_user_name(user) {
                problem(format!("user name {user:?} {reason}"));
                continue;
            }
            let hash = match parse_hash(phc) {
                Ok(hash) => hash,
                Err(message) => {
                    problem(format!("user `{user}`: {message}"));
                    continue;
                }
            };
            if let Some(first) = first_line.insert(user.to_string(), number) {
                problem(format!(
                    "user `{user}` is already defined on line {first}; keep one line per user"
                ));
                continue;
            }
            users.insert(user.to_string(), hash);
        }
        if problems.is_empty() {
            Ok(Self { users })
        } else {
            Err(problems)
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Identifies `user`'s entry (the hash with its salt): it changes when the password
    /// does. `None` for an unknown user.
    pub fn fingerprint(&self, user: &str) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        let hash = self.users.get(user)?;
        let mut hasher = std::hash::DefaultHasher::new();
        hash.to_string().hash(&mut hasher);
        Some(hasher.finish())
    }

    /// Checks a password: CPU-heavy by design (tens of milliseconds), so call it on a
    /// blocking thread. An unknown user costs one verification too, so that the answer
    /// time does not tell which users exist.
    pub fn verify(&self, user: &str, password: &[u8]) -> Verdict {
        let argon2 = Argon2::default();
        match self.users.get(user) {
            Some(hash) => match argon2.verify_password(password, hash) {
                Ok(()) => Verdict::Valid,
                Err(_) => Verdict::WrongPassword,
            },
            None => {
                if let Some(dummy) = dummy_hash() {
                    let _ = argon2.verify_password(password, dummy);
                }
                Verdict::UnknownUser
            }
        }
    }
}

/// A hash with the default cost, for timing-equal refusals of unknown users.
fn dummy_hash() -> Option<&'static PasswordHash> {
    static DUMMY: OnceLock<Option<PasswordHash>> = OnceLock::new();
    DUMMY
        .get_or_init(|| Argon2::default().hash_password(b"edgegw-unknown-user").ok())
        .as_ref()
}

/// Splits a line into user and hash; `None` for blank and comment lines, `Some((_, None))`
/// for a line without `:`.
fn entry(line: &str) -> Option<(&str, Option<&str>)> {
    if line.trim().is_empty() || line.trim_start().starts_with('#') {
        return None;
    }
    Some(match line.split_once(':') {
        Some((user, hash)) => (user, Some(hash.trim())),
        None => (line, None),
    })
}

fn truncate(line: &str) -> String {
    line.chars().take(40).collect()
}

fn parse_hash(phc: &str) -> Result<PasswordHash, String> {
    let hash = PasswordHash::new(phc).map_err(|e| format!("not a PHC hash string ({e})"))?;
    if hash.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "hash algorithm `{}` is not accepted; use argon2id (`edgegw passwd` writes it)",
            hash.algorithm.as_str()
        ));
    }
    argon2::Params::try_from(&hash).map_err(|e| format!("bad argon2id parameters ({e})"))?;
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err("the hash has no salt or no output".into());
    }
    Ok(hash)
}

/// A user name the file can hold: non-empty, no `:` and no control characters.
pub fn check_user_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("is empty")
    } else if name.contains(':') {
        Err("contains `:`, which separates user and hash")
    } else if name.chars().any(char::is_control) {
        Err("contains control characters")
    } else if name.len() > 65_535 {
        Err("is longer than MQTT allows (65535 bytes)")
    } else {
        Ok(())
    }
}

/// Hashes a password with argon2id and the default cost (19 MiB, 2 passes, 1 lane).
pub fn hash_password(password: &[u8]) -> Result<String, PasswordFileError> {
    Argon2::default()
        .hash_password(password)
        .map(|hash| hash.to_string())
        .map_err(|e| PasswordFileError::Hash(e.to_string()))
}

/// Whether [`set_password`] added a user or replaced one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    Added,
    Replaced,
}

/// Adds `user` to the file at `path` or replaces its hash, creating the file with mode
/// 0600. Other lines (comments too) are kept as they are. The file is replaced atomically
/// (write a temporary file beside it, then rename), keeping an existing file's mode.
pub fn set_password(path: &Path, user: &str, password: &[u8]) -> Result<Update, PasswordFileError> {
    check_user_name(user).map_err(|reason| PasswordFileError::UserName {
        name: user.to_string(),
        reason,
    })?;
    let (text, mode) = match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path).map(|m| {
                use std::os::unix::fs::PermissionsExt as _;
                m.permissions().mode() & 0o7777
            });
            (Some(text), mode.ok())
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => (None, None),
        Err(error) => {
            return Err(PasswordFileError::Read {
                path: path.to_path_buf(),
                error,
            });
        }
    };
    if let Some(text) = &text {
        // Refuse to carry bad lines forward: the broker would not start with them.
        PasswordFile::parse(text).map_err(|problems| PasswordFileError::Invalid {
            path: path.to_path_buf(),
            problems,
        })?;
    }
    let line = format!("{user}:{}", hash_password(password)?);
    let (updated, outcome) = replace_user(text.as_deref().unwrap_or(""), user, &line);
    write_atomically(path, updated.as_bytes(), mode.unwrap_or(0o600))?;
    Ok(outcome)
}

/// The file text with `user`'s line replaced by `line`, or `line` appended.
fn replace_user(text: &str, user: &str, line: &str) -> (String, Update) {
    let mut out = String::with_capacity(text.len() + line.len() + 1);
    let mut outcome = Update::Added;
    for existing in text.lines() {
        if matches!(entry(existing), Some((name, Some(_))) if name == user) {
            out.push_str(line);
            outcome = Update::Replaced;
        } else {
            out.push_str(existing);
        }
        out.push('\n');
    }
    if outcome == Update::Added {
        out.push_str(line);
        out.push('\n');
    }
    (out, outcome)
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), PasswordFileError> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let error = |error| PasswordFileError::Write {
        path: path.to_path_buf(),
        error,
    };
    let name = path
        .file_name()
        .ok_or_else(|| error(io::Error::other("the path names no file")))?;
    let temporary = path.with_file_name(format!(
        ".{}.edgegw-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result.map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cheap hash (8 KiB, 1 pass) so tests stay fast; verification reads the cost from
    /// the string.
    fn cheap_hash(password: &str) -> String {
        let params = argon2::Params::new(8, 1, 1, None).unwrap();
        Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(password.as_bytes())
            .unwrap()
            .to_string()
    }

    #[test]
    fn parses_users_comments_and_blank_lines() {
        let text = format!(
            "# users\n\nalice:{}\r\nbob smith:{}\n",
            cheap_hash("a-secret"),
            cheap_hash("b-secret")
        );
        let file = PasswordFile::parse(&text).unwrap();
        assert_eq!(file.len(), 2);
        assert!(file.contains("bob smith"));
        assert_eq!(file.verify("alice", b"a-secret"), Verdict::Valid);
        assert_eq!(file.verify("alice", b"b-secret"), Verdict::WrongPassword);
        assert_eq!(file.verify("bob smith", b"b-secret"), Verdict::Valid);
        assert_eq!(file.verify("carol", b"a-secret"), Verdict::UnknownUser);
        assert_eq!(file.verify("alice", b""), Verdict::WrongPassword);
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let good = cheap_hash("x");
        let argon2i = {
            let params = argon2::Params::new(8, 1, 1, None).unwrap();
            Argon2::new(argon2::Algorithm::Argon2i, argon2::Version::V0x13, params)
                .hash_password(b"x")
                .unwrap()
                .to_string()
        };
        let text = format!(
            "alice:{good}\nno colon here\n:{good}\nbob:plaintext\ncarol:{argon2i}\nalice:{good}\ndave:$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n"
        );
        let problems = PasswordFile::parse(&text).unwrap_err();
        let lines: Vec<usize> = problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5, 6, 7], "{problems:#?}");
        assert!(problems[0].message.contains("expected `user:hash`"));
        assert!(problems[1].message.contains("is empty"));
        assert!(problems[2].message.contains("not a PHC hash string"));
        assert!(problems[3].message.contains("`argon2i` is not accepted"));
        assert!(problems[4].message.contains("already defined on line 1"));
        assert!(problems[5].message.contains("parameters"), "{problems:#?}");

        let error = PasswordFileError::Invalid {
            path: "users.txt".into(),
            problems,
        };
        let shown = error.to_string();
        assert!(shown.starts_with("users.txt:2: expected"), "{shown}");
        assert_eq!(shown.lines().count(), 6, "{shown}");
    }

    #[test]
    fn set_password_creates_0600_and_updates_in_place() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        assert_eq!(set_password(&path, "alice", b"one").unwrap(), Update::Added);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("alice:$argon2id$v=19$m=19456,t=2,p=1$"),
            "{text}"
        );

        // Comments and other users survive; alice's line is replaced where it was.
        let mut text = format!("# site users\n{text}bob:{}\n", cheap_hash("b"));
        std::fs::write(&path, &text).unwrap();
        assert_eq!(
            set_password(&path, "alice", b"two").unwrap(),
            Update::Replaced
        );
        let updated = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = updated.lines().collect();
        assert_eq!(lines.len(), 3, "{updated}");
        assert_eq!(lines[0], "# site users");
        assert!(lines[1].starts_with("alice:$argon2id$"));
        assert!(lines[2].starts_with("bob:"));
        let file = PasswordFile::load(&path).unwrap();
        assert_eq!(file.verify("alice", b"two"), Verdict::Valid);
        assert_eq!(file.verify("alice", b"one"), Verdict::WrongPassword);
        assert_eq!(file.verify("bob", b"b"), Verdict::Valid);

        assert_eq!(set_password(&path, "carol", b"3").unwrap(), Update::Added);
        assert_eq!(PasswordFile::load(&path).unwrap().len(), 3);

        // An existing mode is kept.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        set_password(&path, "carol", b"4").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);

        // A broken file is not rewritten.
        text.push_str("garbage\n");
        std::fs::write(&path, &text).unwrap();
        let error = set_password(&path, "dave", b"5").unwrap_err();
        assert!(
            error.to_string().contains(":4: expected `user:hash`"),
            "{error}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);

        assert!(matches!(
            set_password(&path, "a:b", b"x"),
            Err(PasswordFileError::UserName { .. })
        ));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary files left behind"
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let error = PasswordFile::load(Path::new("/nonexistent/passwd")).unwrap_err();
        let shown = error.to_string();
        assert!(
            shown.starts_with("/nonexistent/passwd: cannot read"),
            "{shown}"
        );
    }
}
