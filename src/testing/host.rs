//! What the harness needs from the machine: where the PostgreSQL and PgBouncer binaries
//! are, which user runs them when this process is root, private temporary directories and
//! random names. Standard library only (no libc).

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::HarnessError;

/// `(uid, gid)` of a user.
pub(super) type UserIds = (u32, u32);

/// The directory holding both `initdb` and `postgres`: the first such directory on `PATH`,
/// else the highest version under `/usr/lib/postgresql/<version>/bin`.
pub(super) fn find_bin_dir() -> Option<PathBuf> {
    let has_binaries =
        |dir: &Path| is_executable(&dir.join("initdb")) && is_executable(&dir.join("postgres"));
    if let Some(dir) = find_on_path(has_binaries) {
        return Some(dir);
    }
    fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = parse_version(entry.file_name().to_str()?)?;
            let bin = entry.path().join("bin");
            has_binaries(&bin).then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
}

/// The `pgbouncer` binary: on `PATH`, else where distributions install it.
pub(super) fn find_pgbouncer() -> Option<PathBuf> {
    let has_pgbouncer = |dir: &Path| is_executable(&dir.join("pgbouncer"));
    find_on_path(has_pgbouncer)
        .or_else(|| {
            ["/usr/sbin", "/usr/local/sbin", "/usr/local/bin"]
                .iter()
                .map(PathBuf::from)
                .find(|dir| has_pgbouncer(dir))
        })
        .map(|dir| dir.join("pgbouncer"))
}

/// The executable `name`: on `PATH`, else in one of `dirs`.
pub(super) fn find_program(name: &str, dirs: &[&str]) -> Option<PathBuf> {
    let has_it = |dir: &Path| is_executable(&dir.join(name));
    find_on_path(has_it)
        .or_else(|| dirs.iter().map(PathBuf::from).find(|dir| has_it(dir)))
        .map(|dir| dir.join(name))
}

/// The first absolute directory on `PATH` that `wanted` accepts.
fn find_on_path(wanted: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .find(|dir| wanted(dir))
}

/// `"15"` → `[15]`, `"9.6"` → `[9, 6]`; `None` for anything else.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// Whether `path` is a file that someone may execute.
pub(super) fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Who runs the PostgreSQL binaries: `None` (this process's user), or, when this process
/// runs as root (which `initdb`, `postgres` and `pgbouncer` refuse), the `postgres` user,
/// else `nobody`.
pub(super) fn server_user() -> Result<Option<UserIds>, HarnessError> {
    match effective_uid() {
        Some(0) => unprivileged_user().map(Some),
        _ => Ok(None),
    }
}

/// The effective uid of this process, without libc: `/proc/self` belongs to it.
fn effective_uid() -> Option<u32> {
    if let Ok(meta) = fs::metadata("/proc/self") {
        return Some(meta.uid());
    }
    let output = Command::new("id").arg("-u").output().ok()?;
    String::from_utf8(output.stdout).ok()?.trim().parse().ok()
}

/// `(uid, gid)` of the `postgres` user, else of `nobody`.
fn unprivileged_user() -> Result<UserIds, HarnessError> {
    let passwd = fs::read_to_string("/etc/passwd")
        .map_err(HarnessError::io("could not read /etc/passwd"))?;
    passwd_ids(&passwd, "postgres")
        .or_else(|| passwd_ids(&passwd, "nobody"))
        .ok_or(HarnessError::NoUnprivilegedUser)
}

/// Looks up `(uid, gid)` of `user` in the contents of an `/etc/passwd` file.
fn passwd_ids(passwd: &str, user: &str) -> Option<UserIds> {
    passwd.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        if fields.next()? != user {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.trim().parse().ok()?;
        let gid = fields.next()?.trim().parse().ok()?;
        Some((uid, gid))
    })
}

/// Gives `paths` to `run_as` (nothing to do when it is `None`), so that the server's user
/// may use them.
pub(super) fn chown_all(paths: &[&Path], run_as: Option<UserIds>) -> Result<(), HarnessError> {
    let Some((uid, gid)) = run_as else {
        return Ok(());
    };
    for path in paths {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(HarnessError::io(format!(
            "could not change the owner of {} to uid {uid}",
            path.display()
        )))?;
    }
    Ok(())
}

/// Creates the directory `path` with the permissions `mode`.
pub(super) fn create_dir(path: &Path, mode: u32) -> Result<(), HarnessError> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(HarnessError::io(format!(
            "could not create {}",
            path.display()
        )))
}

/// Creates `<temp>/plane-db-pg-<pid>-<random>`, readable by this process's user only.
pub(super) fn create_temp_root() -> Result<PathBuf, HarnessError> {
    let temp = std::env::temp_dir();
    loop {
        let path = temp.join(format!(
            "plane-db-pg-{}-{}",
            std::process::id(),
            random_lowercase(8)?
        ));
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(error) => {
                return Err(HarnessError::Io {
                    context: format!("could not create {}", path.display()),
                    source: error,
                })
            }
        }
    }
}

/// `len` random letters `a`–`z`.
pub(super) fn random_lowercase(len: usize) -> Result<String, HarnessError> {
    let mut out = String::with_capacity(len);
    let mut bytes = [0u8; 32];
    while out.len() < len {
        getrandom::fill(&mut bytes).map_err(|error| HarnessError::Random(error.to_string()))?;
        // 234 = 9 * 26: rejecting larger bytes keeps the letters uniform.
        for byte in bytes.iter().filter(|&&byte| byte < 234) {
            if out.len() < len {
                out.push(char::from(b'a' + byte % 26));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lookup() {
        let passwd = "\
root:x:0:0:root:/root:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
# a comment
postgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash
postgresql:x:7:8::/:/bin/sh
broken:x:notanumber:1::/:/bin/sh
";
        assert_eq!(passwd_ids(passwd, "postgres"), Some((101, 104)));
        assert_eq!(passwd_ids(passwd, "nobody"), Some((65534, 65534)));
        assert_eq!(passwd_ids(passwd, "root"), Some((0, 0)));
        assert_eq!(passwd_ids(passwd, "postgr"), None);
        assert_eq!(passwd_ids(passwd, "broken"), None);
        assert_eq!(passwd_ids("", "postgres"), None);
    }

    #[test]
    fn versions_sort_numerically() {
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("latest"), None);
        assert!(parse_version("10") > parse_version("9.6"));
    }

    #[test]
    fn random_names_are_lowercase() {
        let a = random_lowercase(16).unwrap();
        let b = random_lowercase(16).unwrap();
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|byte| byte.is_ascii_lowercase()));
        assert_ne!(a, b);
    }
}
