//! `fs`: read, write and list inside the sandbox directory (`WORKER_FS_ROOT`).
//!
//! Paths are walked one component at a time from a descriptor of the root
//! opened once at start, each component with `openat(.., O_NOFOLLOW)`: no
//! symlink is ever followed and nothing is resolved by path a second time, so
//! a racer swapping a directory for a symlink between a check and a use has
//! no window. Absolute paths and `..` are refused before the walk; files with
//! more than one hard link are refused (a link could name a file outside).

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use serde_json::{Value, json};
use tracing::Instrument;
use tracing::field::Empty;
use wire::step::{FsInput, FsOp};

use super::StepOutcome;

/// The largest file a `read` returns.
const MAX_READ_BYTES: u64 = 1024 * 1024;

pub struct FsBlock {
    /// The sandbox root, opened once: later renames of its path change nothing.
    root: Arc<OwnedFd>,
}

fn violation(message: impl Into<String>) -> StepOutcome {
    StepOutcome::failed("sandbox_violation", message, false)
}

fn not_found() -> StepOutcome {
    StepOutcome::failed(
        "not_found",
        "no such file or directory in the sandbox",
        false,
    )
}

fn io_error(e: impl std::fmt::Display) -> StepOutcome {
    StepOutcome::failed("io_error", e.to_string(), false)
}

/// Directories are opened only as directories, never through a symlink.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl FsBlock {
    /// Creates the root when missing and opens it.
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root)?;
        let fd = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { root: Arc::new(fd) })
    }

    pub async fn execute(&self, input: &FsInput) -> StepOutcome {
        let op = match input.op {
            FsOp::Read => "read",
            FsOp::Write => "write",
            FsOp::List => "list",
        };
        let span = tracing::info_span!(
            "worker.fs",
            fs.operation = op,
            fs.path = input.path.as_str(),
            otel.status_code = Empty,
            error.type = Empty,
        );
        let outcome = self.run(input).instrument(span.clone()).await;
        if let StepOutcome::Failed { code, message, .. } = &outcome {
            telemetry::spans::record_error(&span, code, message);
        }
        outcome
    }

    async fn run(&self, input: &FsInput) -> StepOutcome {
        let relative = Path::new(&input.path);
        if relative.is_absolute() {
            return violation(
                "absolute paths are not allowed; give a path relative to the sandbox",
            );
        }
        let mut names: Vec<std::ffi::OsString> = Vec::new();
        for component in relative.components() {
            match component {
                Component::Normal(name) => names.push(name.to_owned()),
                Component::CurDir => {}
                _ => return violation("`..` is not allowed in paths"),
            }
        }
        let root = self.root.clone();
        let op = input.op;
        let content = input.content.clone().unwrap_or_default();
        // Blocking syscalls: a slow disk must not stall the runtime.
        tokio::task::spawn_blocking(move || {
            let names: Vec<&OsStr> = names.iter().map(|n| n.as_os_str()).collect();
            match op {
                FsOp::Read => read(&root, &names),
                FsOp::List => list(&root, &names),
                FsOp::Write => write(&root, &names, &content),
            }
        })
        .await
        .unwrap_or_else(|e| io_error(format!("the fs task failed: {e}")))
    }
}

/// What opening one component without following links can say.
fn refused(errno: Errno, what: &str) -> StepOutcome {
    match errno {
        // O_NOFOLLOW on a symlink.
        Errno::LOOP => violation(format!("{what} is a symlink; symlinks are not followed")),
        Errno::NOENT => not_found(),
        Errno::NOTDIR => StepOutcome::failed(
            "not_a_directory",
            format!("{what} is not a directory"),
            false,
        ),
        other => io_error(other),
    }
}

/// The directory `names` leads to from `root`, opened component by component.
/// With `create`, missing directories are made on the way.
fn open_dir(root: &OwnedFd, names: &[&OsStr], create: bool) -> Result<OwnedFd, StepOutcome> {
    let mut dir = rustix::io::dup(root).map_err(io_error)?;
    for name in names {
        let next = match rustix::fs::openat(&dir, *name, DIR_FLAGS, Mode::empty()) {
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&dir, *name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(io_error(e)),
                }
                rustix::fs::openat(&dir, *name, DIR_FLAGS, Mode::empty())
            }
            other => other,
        };
        let what = format!("{:?}", name.to_string_lossy());
        dir = match next {
            Ok(next) => next,
            // O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR: name it for what it is.
            Err(Errno::NOTDIR) if is_symlink(&dir, name) => {
                return Err(refused(Errno::LOOP, &what));
            }
            Err(e) => return Err(refused(e, &what)),
        };
    }
    Ok(dir)
}

fn is_symlink(dir: &OwnedFd, name: &OsStr) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|stat| FileType::from_raw_mode(stat.st_mode) == FileType::Symlink)
}

/// Only a regular file with a single link is ours to read or write.
fn check_file(file: &std::fs::File) -> Result<std::fs::Metadata, StepOutcome> {
    let meta = file.metadata().map_err(io_error)?;
    if meta.is_dir() {
        return Err(StepOutcome::failed(
            "is_a_directory",
            "the path is a directory; use op list",
            false,
        ));
    }
    if !meta.is_file() {
        return Err(violation("only regular files can be read or written"));
    }
    if meta.nlink() > 1 {
        return Err(violation(
            "the file has more than one hard link; a link could name a file outside the sandbox",
        ));
    }
    Ok(meta)
}

fn split_last<'a>(names: &'a [&'a OsStr]) -> Option<(&'a OsStr, &'a [&'a OsStr])> {
    names.split_last().map(|(last, parents)| (*last, parents))
}

fn read(root: &OwnedFd, names: &[&OsStr]) -> StepOutcome {
    let Some((name, parents)) = split_last(names) else {
        return StepOutcome::failed(
            "is_a_directory",
            "the path is a directory; use op list",
            false,
        );
    };
    let result = (|| {
        let dir = open_dir(root, parents, false)?;
        // NONBLOCK: a FIFO planted in the sandbox must not hang the step.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let fd = rustix::fs::openat(&dir, name, flags, Mode::empty())
            .map_err(|e| refused(e, "the path"))?;
        let file = std::fs::File::from(fd);
        let meta = check_file(&file)?;
        if meta.len() > MAX_READ_BYTES {
            return Err(StepOutcome::failed(
                "too_large",
                format!("the file is larger than {MAX_READ_BYTES} bytes"),
                false,
            ));
        }
        let mut bytes = Vec::new();
        file.take(MAX_READ_BYTES)
            .read_to_end(&mut bytes)
            .map_err(io_error)?;
        Ok(bytes)
    })();
    match result {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(content) => {
                StepOutcome::Succeeded(json!({"content": content, "size": content.len()}))
            }
            Err(_) => StepOutcome::failed("not_utf8", "the file is not UTF-8 text", false),
        },
        Err(outcome) => outcome,
    }
}

fn list(root: &OwnedFd, names: &[&OsStr]) -> StepOutcome {
    let dir = match open_dir(root, names, false) {
        Ok(dir) => dir,
        Err(outcome) => return outcome,
    };
    let entries = match rustix::fs::Dir::read_from(&dir) {
        Ok(entries) => entries,
        Err(e) => return io_error(e),
    };
    let mut listed: Vec<Value> = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        // Stat by name in the opened directory, the link itself if it is one.
        let Ok(stat) =
            rustix::fs::statat(dir.as_fd(), entry.file_name(), AtFlags::SYMLINK_NOFOLLOW)
        else {
            continue;
        };
        let kind = match FileType::from_raw_mode(stat.st_mode) {
            FileType::Directory => "dir",
            FileType::Symlink => "symlink",
            _ => "file",
        };
        listed.push(json!({
            "name": OsStr::from_bytes(name).to_string_lossy(),
            "kind": kind,
            "size": u64::try_from(stat.st_size).unwrap_or(0),
        }));
    }
    listed.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    StepOutcome::Succeeded(json!({"entries": listed}))
}

fn write(root: &OwnedFd, names: &[&OsStr], content: &str) -> StepOutcome {
    let Some((name, parents)) = split_last(names) else {
        return violation("cannot write the sandbox root");
    };
    let result = (|| {
        let dir = open_dir(root, parents, true)?;
        // No O_TRUNC: the file is checked (regular, one link) before it changes.
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let fd = rustix::fs::openat(&dir, name, flags, Mode::from_raw_mode(0o644)).map_err(
            |e| match e {
                Errno::LOOP => violation("refusing to write through a symlink"),
                other => refused(other, "the path"),
            },
        )?;
        let mut file = std::fs::File::from(fd);
        check_file(&file)?;
        file.set_len(0).map_err(io_error)?;
        file.write_all(content.as_bytes()).map_err(io_error)?;
        Ok(())
    })();
    match result {
        Ok(()) => StepOutcome::Succeeded(json!({"bytes_written": content.len()})),
        Err(outcome) => outcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(op: FsOp, path: &str, content: Option<&str>) -> FsInput {
        FsInput {
            op,
            path: path.to_owned(),
            content: content.map(str::to_owned),
        }
    }

    fn code(outcome: &StepOutcome) -> &'static str {
        match outcome {
            StepOutcome::Failed {
                code, retryable, ..
            } => {
                assert!(!retryable);
                code
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn writes_reads_and_lists_inside_the_sandbox() {
        let dir = tempfile::tempdir().expect("tmp");
        let fs = FsBlock::new(&dir.path().join("sandbox")).expect("root");
        let wrote = fs
            .execute(&input(FsOp::Write, "notes/a.txt", Some("hello")))
            .await;
        assert_eq!(wrote, StepOutcome::Succeeded(json!({"bytes_written": 5})));
        let read = fs.execute(&input(FsOp::Read, "notes/a.txt", None)).await;
        assert_eq!(
            read,
            StepOutcome::Succeeded(json!({"content": "hello", "size": 5}))
        );
        let listed = fs.execute(&input(FsOp::List, "notes", None)).await;
        assert_eq!(
            listed,
            StepOutcome::Succeeded(
                json!({"entries": [{"name": "a.txt", "kind": "file", "size": 5}]})
            )
        );
        assert_eq!(
            code(&fs.execute(&input(FsOp::Read, "missing.txt", None)).await),
            "not_found"
        );
    }

    #[tokio::test]
    async fn traversal_and_absolute_paths_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("secret.txt"), "s3cret").expect("write");
        let fs = FsBlock::new(&dir.path().join("sandbox")).expect("root");
        for path in ["../secret.txt", "a/../../secret.txt", "/etc/passwd"] {
            assert_eq!(
                code(&fs.execute(&input(FsOp::Read, path, None)).await),
                "sandbox_violation",
                "{path}"
            );
            assert_eq!(
                code(&fs.execute(&input(FsOp::Write, path, Some("x"))).await),
                "sandbox_violation",
                "{path}"
            );
        }
        assert_eq!(
            std::fs::read_to_string(dir.path().join("secret.txt")).expect("read"),
            "s3cret"
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn symlinks_leaving_the_sandbox_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(outside.join("secret.txt"), "s3cret").expect("write");
        let root = dir.path().join("sandbox");
        let fs = FsBlock::new(&root).expect("root");
        std::os::unix::fs::symlink(outside.join("secret.txt"), root.join("link.txt"))
            .expect("symlink");
        std::os::unix::fs::symlink(&outside, root.join("door")).expect("symlink dir");

        assert_eq!(
            code(&fs.execute(&input(FsOp::Read, "link.txt", None)).await),
            "sandbox_violation"
        );
        assert_eq!(
            code(
                &fs.execute(&input(FsOp::Read, "door/secret.txt", None))
                    .await
            ),
            "sandbox_violation"
        );
        assert_eq!(
            code(&fs.execute(&input(FsOp::List, "door", None)).await),
            "sandbox_violation"
        );
        assert_eq!(
            code(
                &fs.execute(&input(FsOp::Write, "door/new.txt", Some("x")))
                    .await
            ),
            "sandbox_violation"
        );
        assert_eq!(
            code(&fs.execute(&input(FsOp::Write, "link.txt", Some("x"))).await),
            "sandbox_violation"
        );
        assert!(!outside.join("new.txt").exists());
        assert_eq!(
            std::fs::read_to_string(outside.join("secret.txt")).expect("read"),
            "s3cret"
        );
    }
}
