//! Load generator and test upstream for the pipeline benchmarks (`bench/admission.sh`,
//! `bench/flood.sh`, see `bench/PIPELINE.md`). Loopback only.
//!
//! ```text
//! webhook_load load --url http://127.0.0.1:8080/ --connections 64 --count 200000 [--rate 5000]
//!                   [--contacts N] [--repeat 0.1] [--key K] [--get] [--sent-log FILE]
//! webhook_load upstream --listen 127.0.0.1:8081 [--delay 200ms] [--record FILE]
//! ```
//!
//! `load` sends ActiveCampaign-shaped webhooks (`POST /?wpf_action=update_tags&access_key=K`
//! with the form body `contact[id]=N&contact[tags]=bench, sI`) or, with `--get`, plain GETs
//! (the pass-through peer), over exactly `--connections` keep-alive HTTP/1.1 connections.
//! Closed loop by default (each connection sends its next request when the answer arrived);
//! with `--rate` open loop: request `i` is scheduled at `start + i / rate`, and a request that
//! could not be sent on time because every connection was busy is timed from its scheduled
//! time (no coordinated omission). It prints req/s, the count of each status, and latency
//! percentiles, then a `RESULT key=value …` line for scripts; it exits 1 when an answer was not
//! 2xx (unless allowed with `--allow-status`) or a request failed.
//!
//! `upstream` is a small HTTP/1.1 site: every request is held for `--delay`, answered 200
//! (`<h3>Success</h3>` for webhooks, `--body-size` bytes otherwise), and, with `--record`, one
//! line per request is appended when it is answered:
//! `done_unix_us  in_flight  x-wpf-job  contact[id]  contact[tags]  wpf_action`.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(about = "Load generator and test upstream for the wpf-gateway benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send webhooks (or GETs) and measure the answers.
    Load(LoadArgs),
    /// Serve as a test upstream: hold, answer 200, record what came.
    Upstream(UpstreamArgs),
}

#[derive(Args, Clone)]
struct LoadArgs {
    /// Target, e.g. http://127.0.0.1:8080/ (a loopback address; webhook query is added).
    #[arg(long)]
    url: String,
    /// Keep-alive connections (= requests in flight at most).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Requests to send (measured). With neither --count nor --duration: 10,000.
    #[arg(long)]
    count: Option<u64>,
    /// Stop sending after this long (e.g. "10s"); in flight requests are still awaited.
    /// With --rate: the schedule's length (rate x duration requests, all of them sent).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Open loop: requests per second, sent at fixed intervals.
    #[arg(long)]
    rate: Option<f64>,
    /// Contacts to spread the webhooks over (request i goes to contact base + i % N);
    /// 0: every webhook is a new contact.
    #[arg(long, default_value_t = 0)]
    contacts: u64,
    /// First contact id.
    #[arg(long, default_value_t = 1)]
    contact_base: u64,
    /// Fraction of webhooks that are exact repeats of one of the last 1,000 sent.
    #[arg(long, default_value_t = 0.0)]
    repeat: f64,
    /// The site's access_key.
    #[arg(long, default_value = "bench-access-key-0123456789")]
    key: String,
    /// wpf_action of the webhooks.
    #[arg(long, default_value = "update_tags")]
    action: String,
    /// Send plain GETs to --url instead of webhooks (the pass-through peer).
    #[arg(long)]
    get: bool,
    /// Unmeasured requests sent first (closed loop), e.g. to open connections and warm caches.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Status codes that do not fail the run although they are not 2xx (comma separated).
    #[arg(long, value_delimiter = ',')]
    allow_status: Vec<u16>,
    /// Write one line per measured request: index contact seq start_us end_us status.
    #[arg(long)]
    sent_log: Option<PathBuf>,
    /// Hard limit on the whole run.
    #[arg(long, value_parser = parse_duration, default_value = "600s")]
    max_time: Duration,
    /// One request's limit (then counted as an error).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Runtime threads of the generator.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seed of the repeat choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args, Clone)]
struct UpstreamArgs {
    /// Listen address (loopback), e.g. 127.0.0.1:8081.
    #[arg(long)]
    listen: SocketAddr,
    /// Hold every request this long before answering.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    delay: Duration,
    /// Append one line per answered request to this file.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Bytes in the body of a non-webhook answer.
    #[arg(long, default_value_t = 1024)]
    body_size: usize,
    /// Runtime threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Exit by itself after this long.
    #[arg(long, value_parser = parse_duration, default_value = "3600s")]
    max_time: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (num, unit) = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((text, "s"), |i| text.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {text:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {text:?} (ms, s, m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

fn main() {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Load(a) => a.threads,
        Command::Upstream(a) => a.threads,
    };
    let mut rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let rt = rt.enable_all().build().expect("tokio runtime");
    let code = rt.block_on(async move {
        match cli.command {
            Command::Load(a) => load(a).await,
            Command::Upstream(a) => upstream(a).await,
        }
    });
    std::process::exit(code);
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

// ---------------------------------------------------------------------------------------
// load

/// Where to send, parsed from --url.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    authority: String,
    path: String,
}

fn target(url: &str) -> Result<Target, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("--url {url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("--url must be http://".into());
    }
    let authority = uri.authority().ok_or("--url needs a host")?.clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::from([127, 0, 0, 1])
    } else {
        host.parse()
            .map_err(|_| format!("--url host {host:?} must be a loopback IP or localhost"))?
    };
    if !is_loopback(ip) {
        return Err(format!(
            "--url {ip} is not a loopback address; loopback only"
        ));
    }
    let port = authority.port_u16().unwrap_or(80);
    Ok(Target {
        addr: SocketAddr::new(ip, port),
        authority: authority.to_string(),
        path: uri.path().to_owned(),
    })
}

/// Deterministic per-index randomness (splitmix64).
fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed
        .wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What request `i` is: (contact, seq). A repeat takes the (contact, seq) of an earlier
/// non-repeat request, so its body is byte for byte the same.
#[derive(Clone, Copy)]
struct Plan {
    contacts: u64,
    base: u64,
    repeat: f64,
    seed: u64,
}

impl Plan {
    fn is_repeat(&self, i: u64) -> bool {
        i > 0
            && self.repeat > 0.0
            && (mix(self.seed, i) >> 11) as f64 / (1u64 << 53) as f64 <= self.repeat
    }

    fn of(&self, mut i: u64) -> (u64, u64) {
        // Each step goes strictly back, so this ends (at 0 at the latest).
        while self.is_repeat(i) {
            let back = 1 + mix(self.seed ^ 0x5555, i) % i.min(1000);
            i -= back;
        }
        let contact = if self.contacts == 0 {
            self.base + i
        } else {
            self.base + i % self.contacts
        };
        (contact, i)
    }
}

fn webhook_body(contact: u64, seq: u64) -> Bytes {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("contact[id]", &contact.to_string());
    form.append_pair("contact[tags]", &format!("bench, s{seq}"));
    Bytes::from(form.finish())
}

/// Measurements of one connection task.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    status: BTreeMap<u16, u64>,
    errors: u64,
    first_errors: Vec<String>,
    late: u64,
    log: Vec<(u64, u64, u64, u64, u64, u16)>,
}

impl Tally {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.first_errors.len() < 5 {
            self.first_errors.push(what);
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        for (s, n) in other.status {
            *self.status.entry(s).or_default() += n;
        }
        self.errors += other.errors;
        for e in other.first_errors {
            if self.first_errors.len() < 5 {
                self.first_errors.push(e);
            }
        }
        self.late += other.late;
        self.log.extend(other.log);
    }
}

/// One phase: indices `first .. first + count` (fewer if `until` passes first).
struct Phase {
    first: u64,
    count: u64,
    until: Option<Instant>,
    rate: Option<f64>,
    measured: bool,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

struct Shared {
    args: LoadArgs,
    target: Target,
    plan: Plan,
    next: AtomicU64,
    /// Unix time (µs) of `epoch`, for the sent log.
    epoch_unix_us: u64,
    epoch: Instant,
    deadline: Instant,
}

impl Shared {
    fn new(args: &LoadArgs, target: &Target, plan: Plan, deadline: Instant) -> Arc<Self> {
        Arc::new(Shared {
            args: args.clone(),
            target: target.clone(),
            plan,
            next: AtomicU64::new(0),
            epoch_unix_us: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            epoch: Instant::now(),
            deadline,
        })
    }

    fn request(&self, i: u64) -> (Request<Full<Bytes>>, u64, u64) {
        let builder = Request::builder().header(http::header::HOST, &self.target.authority);
        if self.args.get {
            let req = builder
                .method("GET")
                .uri(self.target.path.as_str())
                .body(Full::new(Bytes::new()))
                .expect("request");
            return (req, 0, i);
        }
        let (contact, seq) = self.plan.of(i);
        let uri = format!(
            "{}?wpf_action={}&access_key={}",
            self.target.path, self.args.action, self.args.key
        );
        let req = builder
            .method("POST")
            .uri(uri)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(Full::new(webhook_body(contact, seq)))
            .expect("request");
        (req, contact, seq)
    }

    fn unix_us(&self, t: Instant) -> u64 {
        self.epoch_unix_us + t.duration_since(self.epoch).as_micros() as u64
    }
}

async fn connection(shared: Arc<Shared>, phase: Arc<Phase>) -> Tally {
    let mut tally = Tally::default();
    let mut sender: Option<Sender> = None;
    let mut connect_failures = 0u32;
    loop {
        let free_at = Instant::now();
        if free_at >= shared.deadline || phase.until.is_some_and(|u| free_at >= u) {
            break;
        }
        let n = phase.count.min(u64::MAX - phase.first);
        let k = shared.next.fetch_add(1, Ordering::Relaxed);
        if k >= n {
            break;
        }
        let i = phase.first + k;
        // Open loop: wait for the slot; a slot already past is timed from the slot.
        let start = match phase.rate {
            Some(rate) => {
                let slot = shared.epoch + Duration::from_secs_f64(k as f64 / rate);
                if slot >= shared.deadline {
                    break;
                }
                if free_at <= slot {
                    tokio::time::sleep_until(slot.into()).await;
                    Instant::now()
                } else {
                    if free_at > slot + Duration::from_millis(1) {
                        tally.late += 1;
                    }
                    slot
                }
            }
            None => free_at,
        };
        if sender.is_none() {
            match connect(shared.target.addr).await {
                Ok(s) => {
                    sender = Some(s);
                    connect_failures = 0;
                }
                Err(e) => {
                    tally.error(e);
                    connect_failures += 1;
                    if connect_failures >= 20 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        let (req, contact, seq) = shared.request(i);
        let sent = Instant::now();
        let exchange = async {
            s.ready().await?;
            let resp = s.send_request(req).await?;
            let status = resp.status();
            // A server that ends keep-alive (`php -S` answers `Connection: close`): the next
            // request goes on a new connection.
            let closing = resp
                .headers()
                .get(http::header::CONNECTION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.to_ascii_lowercase().contains("close"));
            resp.into_body().collect().await?;
            Ok::<(StatusCode, bool), hyper::Error>((status, closing))
        };
        let result = tokio::time::timeout(shared.args.timeout, exchange).await;
        let done = Instant::now();
        match result {
            Ok(Ok((status, closing))) => {
                if closing {
                    sender = None;
                }
                if phase.measured {
                    let us = done.duration_since(start).as_micros();
                    tally
                        .latencies_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                    *tally.status.entry(status.as_u16()).or_default() += 1;
                    if shared.args.sent_log.is_some() {
                        tally.log.push((
                            i,
                            contact,
                            seq,
                            shared.unix_us(sent),
                            shared.unix_us(done),
                            status.as_u16(),
                        ));
                    }
                }
            }
            Ok(Err(e)) => {
                tally.error(format!("request {i}: {e}"));
                sender = None;
            }
            Err(_) => {
                tally.error(format!(
                    "request {i}: no answer within {:?}",
                    shared.args.timeout
                ));
                sender = None;
            }
        }
    }
    tally
}

async fn run_phase(shared: &Arc<Shared>, phase: Phase) -> (Tally, Duration) {
    shared.next.store(0, Ordering::Relaxed);
    let phase = Arc::new(phase);
    let started = Instant::now();
    let tasks: Vec<_> = (0..shared.args.connections.max(1))
        .map(|_| tokio::spawn(connection(shared.clone(), phase.clone())))
        .collect();
    let mut tally = Tally::default();
    for t in tasks {
        match t.await {
            Ok(t) => tally.merge(t),
            Err(e) => tally.error(format!("connection task: {e}")),
        }
    }
    (tally, started.elapsed())
}

/// CPU seconds (user + system) this process used so far, from /proc/self/stat.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3; utime 14 and stime 15 (1-based in proc(5)).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

async fn load(args: LoadArgs) -> i32 {
    let target = match target(&args.url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("webhook_load: {e}");
            return 2;
        }
    };
    if !(0.0..=1.0).contains(&args.repeat) || args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        eprintln!("webhook_load: --repeat must be 0..1 and --rate positive");
        return 2;
    }
    let count = match (args.count, args.duration, args.rate) {
        (Some(c), _, _) => c,
        (None, Some(d), Some(r)) => (d.as_secs_f64() * r).ceil() as u64,
        (None, Some(_), None) => u64::MAX,
        (None, None, _) => 10_000,
    };
    let plan = Plan {
        contacts: args.contacts,
        base: args.contact_base,
        repeat: args.repeat,
        seed: args.seed,
    };
    let deadline = Instant::now() + args.max_time;
    let shared = Shared::new(&args, &target, plan, deadline);
    let mode = if args.get {
        format!("GET {}", shared.target.path)
    } else {
        format!(
            "webhooks wpf_action={} contacts={} repeat={}",
            args.action,
            if args.contacts == 0 {
                "distinct".to_owned()
            } else {
                args.contacts.to_string()
            },
            args.repeat
        )
    };
    let pacing = match args.rate {
        Some(r) => format!("open loop at {r}/s"),
        None => "closed loop".to_owned(),
    };
    println!(
        "target   http://{}{} ({mode})\nload     {} connections, {pacing}",
        shared.target.authority, shared.target.path, args.connections
    );
    let mut warm_errors = 0;
    if args.warmup > 0 {
        let (w, _) = run_phase(
            &shared,
            Phase {
                first: 0,
                count: args.warmup,
                until: None,
                rate: None,
                measured: false,
            },
        )
        .await;
        warm_errors = w.errors;
    }
    // The open-loop schedule starts now.
    let shared = Shared::new(&args, &target, plan, deadline);
    let cpu_before = cpu_seconds();
    // Open loop: every slot of the schedule is sent, late ones too (timed from their slot), so
    // a backlog shows in the latencies instead of shortening the run.
    let until = match args.rate {
        Some(_) => None,
        None => args.duration.map(|d| Instant::now() + d),
    };
    let (mut tally, elapsed) = run_phase(
        &shared,
        Phase {
            first: args.warmup,
            count,
            until,
            rate: args.rate,
            measured: true,
        },
    )
    .await;
    let cpu = cpu_seconds()
        .zip(cpu_before)
        .map_or(0.0, |(after, before)| after - before);
    tally.latencies_us.sort_unstable();
    let done: u64 = tally.status.values().sum();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let req_s = done as f64 / secs;
    let bad: u64 = tally
        .status
        .iter()
        .filter(|(s, _)| !(200..300).contains(*s) && !args.allow_status.contains(s))
        .map(|(_, n)| n)
        .sum();
    let status: Vec<String> = tally
        .status
        .iter()
        .map(|(s, n)| format!("{s}:{n}"))
        .collect();
    let l = &tally.latencies_us;
    let (p50, p90, p99, p999) = (
        percentile(l, 50.0),
        percentile(l, 90.0),
        percentile(l, 99.0),
        percentile(l, 99.9),
    );
    let max = l.last().map_or(0.0, |&m| m as f64 / 1000.0);
    println!("answered {done} in {secs:.2} s: {req_s:.0} req/s");
    println!("status   {}", status.join(" "));
    println!(
        "latency  p50 {p50:.3} ms  p90 {p90:.3} ms  p99 {p99:.3} ms  p99.9 {p999:.3} ms  max {max:.3} ms"
    );
    if args.rate.is_some() {
        println!(
            "late     {} requests found every connection busy at their slot (timed from the slot)",
            tally.late
        );
    }
    println!(
        "cpu      generator {cpu:.2} s ({:.1} us/req)",
        cpu * 1e6 / done.max(1) as f64
    );
    if tally.errors > 0 || warm_errors > 0 {
        println!(
            "errors   {} (+{warm_errors} in warm-up): {}",
            tally.errors,
            tally.first_errors.join("; ")
        );
    }
    println!(
        "RESULT answered={done} req_s={req_s:.1} p50_ms={p50:.3} p90_ms={p90:.3} p99_ms={p99:.3} \
         p999_ms={p999:.3} max_ms={max:.3} bad={bad} errors={} late={} elapsed_s={secs:.3} \
         cpu_s={cpu:.2} status={}",
        tally.errors + warm_errors,
        tally.late,
        status.join(",")
    );
    if let Some(path) = &args.sent_log {
        tally.log.sort_unstable();
        let write = || -> std::io::Result<()> {
            let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
            for (i, contact, seq, start, end, status) in &tally.log {
                writeln!(out, "{i}\t{contact}\t{seq}\t{start}\t{end}\t{status}")?;
            }
            out.flush()
        };
        if let Err(e) = write() {
            eprintln!("webhook_load: {}: {e}", path.display());
            return 1;
        }
    }
    if bad > 0 || tally.errors > 0 || warm_errors > 0 {
        eprintln!(
            "webhook_load: {bad} unexpected answers, {} errors",
            tally.errors + warm_errors
        );
        return 1;
    }
    0
}

// ---------------------------------------------------------------------------------------
// upstream

struct Site {
    delay: Duration,
    body: Bytes,
    record: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    served: AtomicU64,
}

fn clean(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

impl Site {
    async fn answer(
        &self,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Full<Bytes>>, hyper::Error> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let query = req.uri().query().unwrap_or("").to_owned();
        let job = req
            .headers()
            .get("x-wpf-job")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let body = req.into_body().collect().await?.to_bytes();
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let action = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "wpf_action")
            .map(|(_, v)| v.into_owned());
        if let Some(record) = &self.record {
            let mut contact = "-".to_owned();
            let mut tags = "-".to_owned();
            for (k, v) in form_urlencoded::parse(&body) {
                match k.as_ref() {
                    "contact[id]" => contact = clean(&v),
                    "contact[tags]" => tags = clean(&v),
                    _ => {}
                }
            }
            let done_us = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            let line = format!(
                "{done_us}\t{now}\t{}\t{contact}\t{tags}\t{}\n",
                clean(&job),
                clean(action.as_deref().unwrap_or("-"))
            );
            let mut out = record.lock().unwrap_or_else(|p| p.into_inner());
            let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let body = if action.is_some() {
            Bytes::from_static(b"<h3>Success</h3>")
        } else {
            self.body.clone()
        };
        Ok(Response::new(Full::new(body)))
    }
}

async fn upstream(args: UpstreamArgs) -> i32 {
    if !is_loopback(args.listen.ip()) {
        eprintln!("webhook_load: --listen must be a loopback address");
        return 2;
    }
    let record = match &args.record {
        None => None,
        Some(path) => match std::fs::File::options()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => Some(Mutex::new(std::io::BufWriter::new(f))),
            Err(e) => {
                eprintln!("webhook_load: {}: {e}", path.display());
                return 2;
            }
        },
    };
    let listener = match TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("webhook_load: bind {}: {e}", args.listen);
            return 2;
        }
    };
    let site = Arc::new(Site {
        delay: args.delay,
        body: Bytes::from(vec![b'x'; args.body_size]),
        record,
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
        served: AtomicU64::new(0),
    });
    println!("upstream listening on {}", args.listen);
    let accept = {
        let site = site.clone();
        async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let site = site.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let site = site.clone();
                        async move { site.answer(req).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    };
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("webhook_load: signal: {e}");
            return 2;
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = tokio::time::sleep(args.max_time) => eprintln!("upstream: --max-time reached"),
    }
    println!(
        "upstream served {} requests, at most {} at once",
        site.served.load(Ordering::Relaxed),
        site.max_in_flight.load(Ordering::Relaxed)
    );
    0
}
