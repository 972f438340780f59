//! The credentials file of `--credentials`: one identity per device.
//!
//! Sluice authenticates a device by client id = user name = its device id
//! and the secret `sluice devices create ID` printed (alone, on stdout), so
//! the natural file is one `id,secret` line per device, which a shell loop
//! around that command writes directly:
//!
//! ```sh
//! for i in $(seq 0 99); do
//!   echo "sim-$i,$(sluice devices create sim-$i)"
//! done > fleet.csv
//! ```
//!
//! For brokers whose user names differ from client ids, a line may also
//! have three fields, `client_id,username,password`. Blank lines and lines
//! starting with `#` are skipped; spaces around fields are ignored. Fields
//! cannot contain commas (Sluice's ids and secrets never do), so a line with
//! more than three fields is an error rather than a guess.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// How a device identifies itself to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCredentials {
    /// MQTT client id, and the device id the telemetry is stored under.
    pub client_id: String,
    pub username: String,
    pub password: String,
}

/// Reads and checks a credentials file.
pub fn load(path: &Path) -> Result<Vec<DeviceCredentials>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --credentials {}", path.display()))?;
    parse(&text).with_context(|| format!("--credentials {}", path.display()))
}

/// Parses the text of a credentials file (see the module documentation).
pub fn parse(text: &str) -> Result<Vec<DeviceCredentials>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let entry = match fields[..] {
            [id, secret] => DeviceCredentials {
                client_id: id.to_owned(),
                username: id.to_owned(),
                password: secret.to_owned(),
            },
            [client_id, username, password] => DeviceCredentials {
                client_id: client_id.to_owned(),
                username: username.to_owned(),
                password: password.to_owned(),
            },
            _ => bail!(
                "line {number}: expected `id,secret` or `client_id,username,password`, \
                 found {} comma-separated fields",
                fields.len()
            ),
        };
        if entry.client_id.is_empty() {
            bail!("line {number}: the client id is empty");
        }
        if entry.username.is_empty() {
            bail!("line {number}: the user name is empty");
        }
        // Two devices sharing a client id would take each other's session
        // over in a loop: a misconfiguration, not a load.
        if !seen.insert(entry.client_id.clone()) {
            bail!(
                "line {number}: client id `{}` appears twice; each device needs its own",
                entry.client_id
            );
        }
        out.push(entry);
    }
    if out.is_empty() {
        bail!("holds no credentials (expected `id,secret` lines)");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_forms_and_skips_comments() {
        let parsed = parse(
            "# made by sluice devices create\n\
             \n\
             sim-0,Secret0\r\n  sim-1 , Secret1  \n\
             client-2,user-2,pass-2\n",
        )
        .unwrap();
        assert_eq!(parsed.len(), 3);
        assert_eq!(
            parsed[1],
            DeviceCredentials {
                client_id: "sim-1".into(),
                username: "sim-1".into(),
                password: "Secret1".into(),
            }
        );
        assert_eq!(parsed[2].client_id, "client-2");
        assert_eq!(parsed[2].username, "user-2");
        assert_eq!(parsed[2].password, "pass-2");
    }

    #[test]
    fn an_empty_password_is_allowed() {
        assert_eq!(parse("d1,").unwrap()[0].password, "");
    }

    #[test]
    fn bad_files_are_refused_with_the_line() {
        for (text, needle) in [
            ("", "no credentials"),
            ("# only a comment\n", "no credentials"),
            ("just-an-id\n", "line 1"),
            ("a,b\na,b,c,d\n", "line 2"),
            (",secret\n", "client id is empty"),
            ("c,,p\n", "user name is empty"),
            ("d1,x\nd2,y\nd1,z\n", "line 3: client id `d1` appears twice"),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_missing_file_names_itself() {
        let err = load(Path::new("/nonexistent/fleet.csv")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/fleet.csv"));
    }
}
