//! The `fs` sandbox against a racer: a thread that keeps swapping a directory
//! of the sandbox for a symlink to the outside while steps read and write
//! through it, and hard links that point at files outside.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;
use wire::step::{FsInput, FsOp};
use worker::blocks::StepOutcome;
use worker::blocks::fs::FsBlock;

fn input(op: FsOp, path: &str, content: Option<&str>) -> FsInput {
    FsInput {
        op,
        path: path.to_owned(),
        content: content.map(str::to_owned),
    }
}

/// Alternates `root/d` between a real directory (holding `inside` files) and
/// a symlink to `outside`, as fast as it can, until `stop` is set.
fn racer(root: &Path, outside: &Path, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let root = root.to_owned();
    let outside = outside.to_owned();
    std::thread::spawn(move || {
        let (d, parked) = (root.join("d"), root.join("d-parked"));
        let mut swaps = 0;
        while !stop.load(Ordering::Relaxed) {
            // d: real directory -> symlink to the outside.
            let _ = std::fs::rename(&d, &parked);
            let _ = std::os::unix::fs::symlink(&outside, &d);
            std::thread::yield_now();
            // d: symlink -> the real directory again.
            let _ = std::fs::remove_file(&d);
            let _ = std::fs::rename(&parked, &d);
            std::thread::yield_now();
            swaps += 1;
        }
        swaps
    })
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tmp");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir outside");
    std::fs::write(outside.join("secret.txt"), "outside-secret").expect("write");
    let root = dir.path().join("sandbox");
    std::fs::create_dir_all(root.join("d")).expect("mkdir d");
    std::fs::write(root.join("d/secret.txt"), "inside").expect("write");
    (dir, root, outside)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_symlink_swap_race_never_reads_outside() {
    let (_dir, root, outside) = setup();
    let fs = FsBlock::new(&root).expect("root");
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = racer(&root, &outside, stop.clone());
    let (mut inside, mut refused, mut escaped) = (0, 0, 0);
    for _ in 0..300 {
        match fs.execute(&input(FsOp::Read, "d/secret.txt", None)).await {
            StepOutcome::Succeeded(out) if out["content"] == "inside" => inside += 1,
            StepOutcome::Succeeded(out) => {
                assert_eq!(out["content"], Value::from("outside-secret"));
                escaped += 1;
            }
            StepOutcome::Failed { .. } => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().expect("racer");
    assert!(swaps > 0, "the racer never ran");
    assert_eq!(
        escaped, 0,
        "{escaped} of 300 reads returned the file outside the sandbox ({inside} inside, {refused} refused, {swaps} swaps)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_symlink_swap_race_never_writes_outside() {
    let (_dir, root, outside) = setup();
    let fs = FsBlock::new(&root).expect("root");
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = racer(&root, &outside, stop.clone());
    for i in 0..500 {
        let path = format!("d/new-{i}.txt");
        let _ = fs.execute(&input(FsOp::Write, &path, Some("x"))).await;
        let _ = fs
            .execute(&input(FsOp::Write, "d/secret.txt", Some("overwritten")))
            .await;
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().expect("racer");
    let leaked: Vec<_> = std::fs::read_dir(&outside)
        .expect("list outside")
        .map(|e| e.expect("entry").file_name())
        .filter(|name| name != "secret.txt")
        .collect();
    assert!(leaked.is_empty(), "writes escaped the sandbox: {leaked:?}");
    assert_eq!(
        std::fs::read_to_string(outside.join("secret.txt")).expect("read"),
        "outside-secret"
    );
}

#[tokio::test]
async fn fs_hard_link_to_an_outside_file_is_refused() {
    let (_dir, root, outside) = setup();
    let fs = FsBlock::new(&root).expect("root");
    std::fs::hard_link(outside.join("secret.txt"), root.join("linked.txt")).expect("hard link");
    for outcome in [
        fs.execute(&input(FsOp::Read, "linked.txt", None)).await,
        fs.execute(&input(FsOp::Write, "linked.txt", Some("changed")))
            .await,
    ] {
        match outcome {
            StepOutcome::Failed {
                code, retryable, ..
            } => {
                assert_eq!(code, "sandbox_violation");
                assert!(!retryable);
            }
            other => panic!("a hard link to an outside file was used: {other:?}"),
        }
    }
    assert_eq!(
        std::fs::read_to_string(outside.join("secret.txt")).expect("read"),
        "outside-secret"
    );
}
