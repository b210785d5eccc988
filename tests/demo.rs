//! `credproxy demo`: start it as a user would, run the curl command and the
//! `credproxy exec` command it prints, and get the demo API's 200 although curl
//! sends no credentials.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::cli::{self, TestDir};
use crate::support::client;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_curl_command_gets_200_through_the_demo() {
    let dir = TestDir::new();
    let mut child = cli::spawn(
        dir.path(),
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let command = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(command) = line.trim().strip_prefix("curl ") {
                return command.to_owned();
            }
        }
        panic!("the demo exited without printing a curl command");
    })
    .await
    .expect("the demo printed no curl command in time");

    // The printed arguments contain no spaces or quotes: split like a shell would.
    let args: Vec<&str> = command.split_whitespace().collect();
    assert!(
        args.contains(&"-x") && args.contains(&"--cacert"),
        "{command}"
    );
    let mut with_status = args.clone();
    with_status.extend(["-w", "\n%{http_code}"]);
    let out = client::curl(&with_status, WAIT).await;
    out.success();
    let (body, status) = out.stdout.rsplit_once('\n').unwrap();
    assert_eq!(status, "200", "{body}");
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["message"], "hello from api.demo.test");

    let exec = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(" exec -- curl ") {
                return line;
            }
        }
        panic!("the demo exited without printing an exec command");
    })
    .await
    .expect("the demo printed no exec command in time");
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert!(args[0].ends_with("credproxy"), "{exec}");
    let mut with_status = args[1..].to_vec();
    with_status.extend(["-sS", "-w", "\n%{http_code}"]);
    let out = cli::run_in(dir.path(), &with_status, &[], WAIT).await;
    out.assert_code(0);
    let (body, status) = out.stdout.rsplit_once('\n').unwrap();
    assert_eq!(status, "200", "{body}");
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["message"], "hello from api.demo.test");

    cli::terminate(&child);
    let output = cli::collect(child, &["demo"]).await;
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    // The live view shows the request and the refresh.
    assert!(
        output.stderr.contains("token refreshed"),
        "{}",
        output.stderr
    );
    assert!(output.stderr.contains("status=200"), "{}", output.stderr);
}
