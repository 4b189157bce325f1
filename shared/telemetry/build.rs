//! Stamps the git revision the services are built from into
//! `BEAMLINE_GIT_REVISION` (`vcs.ref.head.revision`, `component_build_info`).
//!
//! Order: the `BEAMLINE_GIT_REVISION` environment variable (a Docker build
//! has no `.git`: pass it as a build argument), else `git rev-parse HEAD` of
//! this checkout, else `unknown`. Never fails the build.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=BEAMLINE_GIT_REVISION");
    let revision = match std::env::var("BEAMLINE_GIT_REVISION") {
        Ok(value) if !value.trim().is_empty() => value.trim().to_owned(),
        _ => {
            // Rebuilt when HEAD moves: HEAD itself, the branch it names, and
            // packed refs (a worktree's HEAD lives in its own git dir).
            if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
                let dir = PathBuf::from(dir);
                println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
                if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"])
                    && let Some(common) = git(&["rev-parse", "--git-common-dir"])
                {
                    let common = PathBuf::from(common);
                    println!("cargo:rerun-if-changed={}", common.join(&branch).display());
                    println!(
                        "cargo:rerun-if-changed={}",
                        common.join("packed-refs").display()
                    );
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    println!("cargo:rustc-env=BEAMLINE_GIT_REVISION={revision}");
}
