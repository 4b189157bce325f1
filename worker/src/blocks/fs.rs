//! `fs`: read, write and list inside the sandbox directory (`WORKER_FS_ROOT`).
//! Absolute paths, `..` and symlinks that leave the sandbox are refused.

use std::path::{Component, Path, PathBuf};

use serde_json::json;
use tracing::Instrument;
use tracing::field::Empty;
use wire::step::{FsInput, FsOp};

use super::StepOutcome;

/// The largest file a `read` returns.
const MAX_READ_BYTES: u64 = 1024 * 1024;

pub struct FsBlock {
    /// Canonical (symlink-free) sandbox root.
    root: PathBuf,
}

fn violation(message: impl Into<String>) -> StepOutcome {
    StepOutcome::failed("sandbox_violation", message, false)
}

impl FsBlock {
    /// Creates the root when missing.
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root)?;
        Ok(Self {
            root: root.canonicalize()?,
        })
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
        if relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return violation("`..` is not allowed in paths");
        }
        let target = self.root.join(relative);
        match input.op {
            FsOp::Read => self.read(&target).await,
            FsOp::List => self.list(&target).await,
            FsOp::Write => {
                self.write(&target, input.content.as_deref().unwrap_or(""))
                    .await
            }
        }
    }

    /// `path` with every symlink resolved, refused unless inside the root.
    async fn inside(&self, path: &Path) -> Result<PathBuf, StepOutcome> {
        match tokio::fs::canonicalize(path).await {
            Ok(real) if real.starts_with(&self.root) => Ok(real),
            Ok(_) => Err(violation("the path leaves the sandbox through a symlink")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StepOutcome::failed(
                "not_found",
                "no such file or directory in the sandbox",
                false,
            )),
            Err(e) => Err(StepOutcome::failed("io_error", e.to_string(), false)),
        }
    }

    async fn read(&self, target: &Path) -> StepOutcome {
        let real = match self.inside(target).await {
            Ok(real) => real,
            Err(outcome) => return outcome,
        };
        match tokio::fs::metadata(&real).await {
            Ok(meta) if meta.is_dir() => {
                return StepOutcome::failed(
                    "is_a_directory",
                    "the path is a directory; use op list",
                    false,
                );
            }
            Ok(meta) if meta.len() > MAX_READ_BYTES => {
                return StepOutcome::failed(
                    "too_large",
                    format!("the file is larger than {MAX_READ_BYTES} bytes"),
                    false,
                );
            }
            Ok(_) => {}
            Err(e) => return StepOutcome::failed("io_error", e.to_string(), false),
        }
        match tokio::fs::read(&real).await {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(content) => {
                    StepOutcome::Succeeded(json!({"content": content, "size": content.len()}))
                }
                Err(_) => StepOutcome::failed("not_utf8", "the file is not UTF-8 text", false),
            },
            Err(e) => StepOutcome::failed("io_error", e.to_string(), false),
        }
    }

    async fn list(&self, target: &Path) -> StepOutcome {
        let real = match self.inside(target).await {
            Ok(real) => real,
            Err(outcome) => return outcome,
        };
        let mut dir = match tokio::fs::read_dir(&real).await {
            Ok(dir) => dir,
            Err(e) => return StepOutcome::failed("io_error", e.to_string(), false),
        };
        let mut entries = Vec::new();
        while let Ok(Some(entry)) = dir.next_entry().await {
            let Ok(meta) = entry.metadata().await else {
                continue;
            };
            let kind = if meta.is_dir() {
                "dir"
            } else if meta.file_type().is_symlink() {
                "symlink"
            } else {
                "file"
            };
            entries.push(json!({
                "name": entry.file_name().to_string_lossy(),
                "kind": kind,
                "size": meta.len(),
            }));
        }
        entries.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        StepOutcome::Succeeded(json!({"entries": entries}))
    }

    async fn write(&self, target: &Path, content: &str) -> StepOutcome {
        let Some(parent) = target.parent() else {
            return violation("cannot write the sandbox root");
        };
        // The deepest existing ancestor must be inside the root before any
        // directory is created (a symlinked directory could point outside).
        let mut existing = parent.to_path_buf();
        while !existing.exists() {
            if !existing.pop() {
                break;
            }
        }
        if let Err(outcome) = self.inside(&existing).await {
            return outcome;
        }
        if let Err(e) = tokio::fs::create_dir_all(parent).await {
            return StepOutcome::failed("io_error", e.to_string(), false);
        }
        if let Err(outcome) = self.inside(parent).await {
            return outcome;
        }
        if let Ok(meta) = tokio::fs::symlink_metadata(target).await
            && meta.file_type().is_symlink()
        {
            return violation("refusing to write through a symlink");
        }
        match tokio::fs::write(target, content).await {
            Ok(()) => StepOutcome::Succeeded(json!({"bytes_written": content.len()})),
            Err(e) => StepOutcome::failed("io_error", e.to_string(), false),
        }
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
