//! Issue 11: `credproxy run` out of file descriptors (`RLIMIT_NOFILE` 128, 300
//! connection attempts) refuses connections without spinning, logs that at most once a
//! second, and serves again as soon as descriptors are free.

use std::time::Duration;

use http::StatusCode;
use tokio::net::TcpStream;

use crate::support::client;
use crate::support::proxy::{ProxyOptions, Setup};
use crate::support::rlimit;
use crate::support::wait;

const NOFILE: u64 = 128;
const ATTEMPTS: usize = 300;
/// The CPU time credproxy used is measured over this long while exhausted.
const WINDOW: Duration = Duration::from_secs(2);
const EXHAUSTED: &str = "out of file descriptors or memory";

/// User plus system CPU time of `pid`, in clock ticks (fields 14 and 15 of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name, field 3 (state) is index 0: utime (14) is 11, stime (15) is 12.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Connections waiting in the accept queue of the IPv4 listener on `port`: for a
/// listening socket, the rx_queue column of /proc/net/tcp.
fn accept_queue(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields[1].ends_with(&port) && fields[3] == "0A")
        .map_or(0, |fields| {
            let rx = fields[4].split(':').nth(1).unwrap();
            usize::from_str_radix(rx, 16).unwrap()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_refuses_without_spinning_and_recovers() {
    let setup = Setup::start().await;
    let proxy = setup.spawn_proxy(&ProxyOptions::default()).await;
    let pid = proxy.pid();
    rlimit::limit_open_files(pid, NOFILE);

    let episode = std::time::Instant::now();
    let mut held = Vec::new();
    for _ in 0..ATTEMPTS {
        // The kernel completes the handshake from the listen backlog; credproxy may
        // then accept, or refuse (close) the connection.
        if let Ok(stream) = TcpStream::connect(proxy.proxy_addr).await {
            held.push(stream);
        }
    }
    proxy.wait_for_log(EXHAUSTED).await;

    let ticks_per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap();
    let before = cpu_ticks(pid);
    // A measuring window, not a wait for an event.
    tokio::time::sleep(WINDOW).await;
    let used = cpu_ticks(pid) - before;
    let budget = ticks_per_second * WINDOW.as_secs() / 5;
    println!(
        "credproxy used {used} of {} clock ticks (budget {budget}) while out of descriptors",
        ticks_per_second * WINDOW.as_secs()
    );
    assert!(
        used <= budget,
        "credproxy spun: {used} ticks of CPU in {WINDOW:?} (at most {budget})"
    );

    drop(held);
    // The backlog's dead connections are accepted and closed too; until then a new
    // connection may still be refused for want of a descriptor.
    wait::until("credproxy closed the released connections", || {
        open_files(pid) < usize::try_from(NOFILE).unwrap() / 2
            && accept_queue(proxy.proxy_addr.port()) == 0
    })
    .await;
    let episode = episode.elapsed();
    let answer = client::proxy_get(proxy.proxy_addr, "http://api.test/echo", &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let health = client::reqwest_direct()
        .get(format!("http://{}/healthz", proxy.admin_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    let exit = proxy.stop().await;
    let lines = exit.log.lines().filter(|l| l.contains(EXHAUSTED)).count();
    // At most one a second (plus the first) over the whole episode.
    let bound = usize::try_from(episode.as_secs()).unwrap() + 2;
    assert!(
        (1..=bound).contains(&lines),
        "{lines} lines about running out in {episode:?}:\n{}",
        exit.log
    );
}
