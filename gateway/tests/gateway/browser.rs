//! The dashboard in a real browser: Debian's Chromium, headless, driven
//! through `chromedriver` with fantoccini, against the gateway on the memory
//! store and a manual clock. Signs in (and first fails to, with a wrong
//! key), reads the keys, the chart and the live traffic after a known
//! sequence of requests, adds a key through the page and uses it, disables
//! it and sees it refused, and checks that the browser logged no error.
//! A second browser runs 14 hours ahead of UTC (Pacific/Kiritimati), late
//! in the gateway's UTC day, and must still ask for and show the gateway's
//! UTC days.
//!
//! Each view is saved as a PNG under `target/tmp/dashboard/`. Without
//! `chromium` and `chromedriver` the test fails with how to install them,
//! or is skipped with `TOLLGATE_SKIP_BROWSER=1`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use tollgate::config::Config;
use tollgate::{ManualClock, MemoryStore};

use crate::support::at;

const ADMIN: &str = "admin-secret";
/// An id a careless page would turn into markup.
const MARKUP_ID: &str = "x\"><img/src=x/onerror=alert(1)>";

/// Whether the browser test can run; see the module documentation.
fn require_browser() -> bool {
    let runs = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if runs("chromedriver") && (runs("chromium") || runs("chromium-browser")) {
        return true;
    }
    if std::env::var("TOLLGATE_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!("notice: TOLLGATE_SKIP_BROWSER=1: skipping the dashboard's browser test");
        return false;
    }
    panic!(
        "the dashboard's browser test needs `chromium` and `chromedriver` on PATH.\n\
         Install them (Debian: `apt-get install chromium chromium-driver`), or set \
         TOLLGATE_SKIP_BROWSER=1 to skip it."
    );
}

/// `chromedriver` on a free loopback port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        Driver::start_in(None)
    }

    /// `chromedriver`, and the browsers it starts, in the time zone `tz`
    /// (the `TZ` variable) when given, else in this process's.
    fn start_in(tz: Option<&str>) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new("chromedriver");
        // Its own process group, so that the browsers it starts end with it
        // even when the test fails before closing its session.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        if let Some(tz) = tz {
            cmd.env("TZ", tz);
        }
        let child = cmd
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn connect(&self) -> Client {
        let mut caps = serde_json::Map::new();
        let mut options = json!({"args": [
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1366,1000",
        ]});
        if std::path::Path::new("/usr/bin/chromium").exists() {
            options["binary"] = "/usr/bin/chromium".into();
        }
        caps.insert("goog:chromeOptions".into(), options);
        caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&self.url)
                .await
            {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot start a Chromium session: {e}"),
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        #[cfg(unix)]
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// chromedriver's `POST /session/ID/se/log`: the browser's console
/// messages since the last call.
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.to_owned()))
    }
}

/// The console messages of level SEVERE since the last call.
async fn console_errors(c: &Client) -> Vec<String> {
    let log = c.issue_cmd(BrowserLog).await.expect("read the browser log");
    log.as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["level"] == "SEVERE")
        .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn shots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(shots().join(format!("{name}.png")), png).unwrap();
}

/// Waits up to 10 s for `css` to hold an element whose text passes `ok`.
async fn wait_text(c: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(text) = e.text().await {
                if ok(&text) {
                    return text;
                }
                last = text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "waited for `{css}`; last text: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Each row of `table` (by CSS) as its cells' texts.
async fn rows(c: &Client, table: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for row in c
        .find_all(Locator::Css(&format!("{table} tbody tr")))
        .await
        .unwrap()
    {
        let mut cells = Vec::new();
        for cell in row.find_all(Locator::Css("td")).await.unwrap() {
            cells.push(cell.text().await.unwrap());
        }
        out.push(cells);
    }
    out
}

/// The row of the key `id` in the keys table: id, plan, account, enabled,
/// used, remaining.
async fn key_row(c: &Client, id: &str) -> Vec<String> {
    rows(c, "#keys-table")
        .await
        .into_iter()
        .find(|r| r.first().map(String::as_str) == Some(id))
        .unwrap_or_else(|| panic!("no row for {id}"))
        .into_iter()
        .take(6)
        .collect()
}

/// Status of a completion with `key`.
async fn complete(base: &str, key: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .header("authorization", format!("Bearer {key}"))
        .json(&json!({"model": "m", "prompt": "hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_chromium() {
    if !require_browser() {
        return;
    }
    // The gateway, two days before "today".
    let clock = ManualClock::new();
    clock.set_wall(at(2026, 12, 4, 36_000));
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    let config = Config::from_toml(super::dashboard::CONFIG).unwrap();
    let app = tollgate_gateway::app(&config, store).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tollgate_gateway::serve(listener, app, async {
        let _ = stopped.await;
    }));

    // The known sequence: pro-1 2, 1 and 3 requests on three days; on the
    // last, free-1 5 (a burst of 3, then 2 throttled).
    for _ in 0..2 {
        assert_eq!(complete(&base, "pro-key-1").await, 200);
    }
    clock.set_wall(at(2026, 12, 5, 36_000));
    assert_eq!(complete(&base, "pro-key-1").await, 200);
    clock.set_wall(at(2026, 12, 6, 36_000));
    for _ in 0..3 {
        assert_eq!(complete(&base, "pro-key-1").await, 200);
    }
    let mut free = Vec::new();
    for _ in 0..5 {
        free.push(complete(&base, "free-key-1").await);
    }
    assert_eq!(free, [200, 200, 200, 429, 429]);
    // A key whose id looks like markup.
    let res = reqwest::Client::new()
        .post(format!("{base}/admin/keys"))
        .header("x-admin-key", ADMIN)
        .json(&json!({"id": MARKUP_ID, "value": "markup-key-1", "plan": "free"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);

    let driver = Driver::start();
    let c = driver.connect().await;
    let page = format!("{base}/admin/ui");

    // A wrong admin key sees no data.
    c.goto(&page).await.unwrap();
    c.find(Locator::Id("admin-key"))
        .await
        .unwrap()
        .send_keys("wrong-admin-key")
        .await
        .unwrap();
    click(&c, "#signin-form button[type=submit]").await;
    wait_text(&c, "#signin-error", |t| t.contains("refused")).await;
    assert!(rows(&c, "#plans-table").await.is_empty());
    assert!(rows(&c, "#keys-table").await.is_empty());
    assert!(
        !c.find(Locator::Id("nav"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap()
    );
    let stored = c
        .execute(
            "return [sessionStorage.length, localStorage.length, location.href];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(stored, json!([0, 0, page]));
    screenshot(&c, "1-signin-refused").await;
    // The only error logged is the refused call itself (which also shows
    // that the log is read).
    let errors = console_errors(&c).await;
    assert!(!errors.is_empty());
    for e in errors {
        assert!(e.contains("403"), "{e}");
    }

    // Sign in: plans and accounts.
    c.find(Locator::Id("admin-key"))
        .await
        .unwrap()
        .send_keys(ADMIN)
        .await
        .unwrap();
    click(&c, "#signin-form button[type=submit]").await;
    wait_text(&c, "#plans-table tbody", |t| t.contains("free")).await;
    let plans = rows(&c, "#plans-table").await;
    assert_eq!(plans[0][0], "free");
    assert_eq!(plans[0][2], "1,000 / DAY");
    assert_eq!(plans[0][3], "2026-12-07 00:00:00 UTC");
    assert_eq!(plans[1][2], "100,000 / MONTH");
    let accounts = rows(&c, "#accounts-table").await;
    assert_eq!(
        accounts[0][..5],
        ["acme", "—", "50,000 / MONTH", "3", "49,997"]
    );
    // The key is in this tab's session storage, nowhere else.
    let stored = c
        .execute(
            "return [sessionStorage.getItem('tollgate-admin-key'), localStorage.length, location.href];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(stored, json!([ADMIN, 0, page]));
    screenshot(&c, "2-plans-and-accounts").await;

    // Keys: the config's, with today's counts.
    click(&c, "#nav [data-view=keys]").await;
    wait_text(&c, "#keys-table tbody", |t| t.contains("pro-1")).await;
    assert_eq!(
        key_row(&c, "free-1").await,
        ["free-1", "free", "acme", "yes", "3", "997"]
    );
    assert_eq!(
        key_row(&c, "pro-1").await,
        ["pro-1", "pro", "—", "yes", "3", "99,994"]
    );
    let tokens = c
        .find(Locator::Css("tr[data-key='free-1'] td.c-tokens"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(tokens, "39,991 of 40,000/min");
    // The markup id is text: the characters themselves, no element made.
    assert_eq!(key_row(&c, MARKUP_ID).await[0], MARKUP_ID);
    assert!(c.find_all(Locator::Css("img")).await.unwrap().is_empty());
    // The filter.
    c.find(Locator::Id("key-filter"))
        .await
        .unwrap()
        .send_keys("acme")
        .await
        .unwrap();
    wait_text(&c, "#keys-table tbody", |t| !t.contains("pro-1")).await;
    assert_eq!(rows(&c, "#keys-table").await.len(), 1);
    screenshot(&c, "3-keys-filtered").await;
    c.find(Locator::Id("key-filter"))
        .await
        .unwrap()
        .clear()
        .await
        .unwrap();
    c.execute(
        "document.getElementById('key-filter').dispatchEvent(new Event('input'));",
        vec![],
    )
    .await
    .unwrap();
    wait_text(&c, "#keys-table tbody", |t| t.contains("pro-1")).await;
    screenshot(&c, "4-keys").await;

    // pro-1's usage per day: the chart's bars and the table.
    click(&c, "tr[data-key='pro-1'] button.chart-key").await;
    wait_text(&c, "#usage-table tbody", |t| t.contains("2026-12-06")).await;
    let mut bars = Vec::new();
    for bar in c
        .find_all(Locator::Css("#usage-chart rect.bar"))
        .await
        .unwrap()
    {
        bars.push((
            bar.attr("data-day").await.unwrap().unwrap(),
            bar.attr("data-used").await.unwrap().unwrap(),
        ));
    }
    let expected: Vec<(String, String)> = [
        ("2026-11-30", "0"),
        ("2026-12-01", "0"),
        ("2026-12-02", "0"),
        ("2026-12-03", "0"),
        ("2026-12-04", "2"),
        ("2026-12-05", "1"),
        ("2026-12-06", "3"),
    ]
    .iter()
    .map(|(d, n)| (d.to_string(), n.to_string()))
    .collect();
    assert_eq!(bars, expected);
    let table: Vec<Vec<String>> = rows(&c, "#usage-table").await;
    assert_eq!(table[4], ["2026-12-04", "2", "99,998"]);
    assert_eq!(table[6], ["2026-12-06", "3", "99,994"]);
    assert!(
        c.find(Locator::Css("#usage-chart .quota-line"))
            .await
            .is_ok()
    );
    screenshot(&c, "5-usage-chart").await;

    // Live traffic: today's decisions (the manual clock stands at 10:00).
    click(&c, "#nav [data-view=traffic]").await;
    wait_text(&c, "#top-table tbody", |t| t.contains("free-1")).await;
    let traffic = rows(&c, "#traffic-table").await;
    assert_eq!(traffic[0][..2], ["allowed", "6"]);
    assert_eq!(traffic[1][..2], ["throttled", "2"]);
    assert_eq!(rows(&c, "#top-table").await, [["free-1", "2"]]);
    screenshot(&c, "6-live-traffic").await;

    // Add a key through the page, with a generated value, and use it.
    click(&c, "#nav [data-view=keys]").await;
    wait_text(&c, "#keys-table tbody", |t| t.contains("pro-1")).await;
    c.find(Locator::Id("new-id"))
        .await
        .unwrap()
        .send_keys("web-1")
        .await
        .unwrap();
    c.find(Locator::Id("new-plan"))
        .await
        .unwrap()
        .select_by_value("pro")
        .await
        .unwrap();
    click(&c, "#add-key-form button[type=submit]").await;
    wait_text(&c, "#status", |t| t == "Key web-1 added to plan pro.").await;
    let value = wait_text(&c, "#new-key-value", |t| t.starts_with("tg-")).await;
    assert_eq!(value.len(), 67);
    assert_eq!(complete(&base, &value).await, 200);
    screenshot(&c, "7-key-added").await;
    click(&c, "#new-key-done").await;
    assert_eq!(
        c.find(Locator::Id("new-key-value"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        ""
    );

    // Disable it through the page: its next request is refused.
    click(&c, "tr[data-key='web-1'] button.toggle").await;
    wait_text(&c, "#status", |t| t == "Key web-1 disabled.").await;
    assert_eq!(key_row(&c, "web-1").await[3], "no");
    assert_eq!(complete(&base, &value).await, 403);
    // Set pro-1's remaining quota and move web-1, each confirmed.
    c.find(Locator::Css("tr[data-key='pro-1'] input.remaining"))
        .await
        .unwrap()
        .send_keys("12345")
        .await
        .unwrap();
    click(&c, "tr[data-key='pro-1'] button.set-remaining").await;
    wait_text(&c, "#status", |t| {
        t == "Key pro-1: remaining quota set to 12,345."
    })
    .await;
    assert_eq!(key_row(&c, "pro-1").await[5], "12,345");
    c.find(Locator::Css("tr[data-key='web-1'] select.plan"))
        .await
        .unwrap()
        .select_by_value("free")
        .await
        .unwrap();
    click(&c, "tr[data-key='web-1'] button.move").await;
    wait_text(&c, "#status", |t| t == "Key web-1 moved to plan free.").await;
    assert_eq!(key_row(&c, "web-1").await[1], "free");
    screenshot(&c, "8-key-disabled-and-moved").await;

    // Keyboard only: sign out, then sign in again with Enter.
    click(&c, "#signout").await;
    let active = c
        .execute("return document.activeElement.id;", vec![])
        .await
        .unwrap();
    assert_eq!(active, "admin-key");
    c.find(Locator::Id("admin-key"))
        .await
        .unwrap()
        .send_keys(&format!("{ADMIN}\u{E007}"))
        .await
        .unwrap();
    wait_text(&c, "#plans-table tbody", |t| t.contains("free")).await;

    let errors = console_errors(&c).await;
    assert!(errors.is_empty(), "the browser logged errors: {errors:?}");
    c.close().await.unwrap();
}

/// The request paths the page has fetched that hold `part`.
async fn fetched(c: &Client, part: &str) -> Vec<String> {
    let names = c
        .execute(
            "return performance.getEntriesByType('resource').map((e) => e.name);",
            vec![],
        )
        .await
        .unwrap();
    names
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .filter(|n| n.contains(part))
        .map(|n| n.split_once("/admin/").map_or(n, |(_, p)| p).to_owned())
        .collect()
}

/// The dashboard in a browser 14 hours ahead of UTC (Pacific/Kiritimati),
/// late in the gateway's UTC day, when the browser's own date is already
/// the next one. The page's days are the gateway's UTC days: the default
/// range ends on the gateway's today (a range taken from the browser's
/// date would start or end a day late, and a report refuses a start after
/// today with a 400), and the key's and the account's usage both show,
/// not an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_ahead_of_utc() {
    if !require_browser() {
        return;
    }
    // 20:00 UTC on 2026-12-06, which is 10:00 on 2026-12-07 in Kiritimati.
    let clock = ManualClock::new();
    clock.set_wall(at(2026, 12, 6, 72_000));
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    let config = Config::from_toml(super::dashboard::CONFIG).unwrap();
    let app = tollgate_gateway::app(&config, store).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tollgate_gateway::serve(listener, app, async {
        let _ = stopped.await;
    }));
    for _ in 0..2 {
        assert_eq!(complete(&base, "pro-key-1").await, 200);
    }
    for _ in 0..3 {
        assert_eq!(complete(&base, "free-key-1").await, 200);
    }

    let driver = Driver::start_in(Some("Pacific/Kiritimati"));
    let c = driver.connect().await;
    c.goto(&format!("{base}/admin/ui")).await.unwrap();
    // The browser is in Kiritimati, where the gateway's instant falls on
    // the next day.
    let zone = c
        .execute(
            "return [Intl.DateTimeFormat().resolvedOptions().timeZone, \
             new Date().getTimezoneOffset(), new Date(Date.UTC(2026, 11, 6, 20)).getDate()];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(zone, json!(["Pacific/Kiritimati", -840, 7]));

    c.find(Locator::Id("admin-key"))
        .await
        .unwrap()
        .send_keys(ADMIN)
        .await
        .unwrap();
    click(&c, "#signin-form button[type=submit]").await;
    wait_text(&c, "#plans-table tbody", |t| t.contains("free")).await;
    assert_eq!(
        rows(&c, "#plans-table").await[0][3],
        "2026-12-07 00:00:00 UTC"
    );
    assert_eq!(
        rows(&c, "#accounts-table").await[0][..5],
        ["acme", "—", "50,000 / MONTH", "3", "49,997"]
    );
    // The header's clock: the browser's time, in UTC.
    let utc_date = "return new Date().toISOString().slice(0, 10);";
    let before = c.execute(utc_date, vec![]).await.unwrap();
    let shown = wait_text(&c, "#clock", |t| t.ends_with(" UTC")).await;
    let after = c.execute(utc_date, vec![]).await.unwrap();
    assert!(
        [before, after]
            .iter()
            .any(|d| d.as_str() == Some(&shown[..10])),
        "{shown}"
    );

    click(&c, "#nav [data-view=keys]").await;
    wait_text(&c, "#keys-date", |t| !t.is_empty()).await;
    assert_eq!(
        wait_text(&c, "#keys-date", |_| true).await,
        "Today: 2026-12-06 (UTC)"
    );

    // The key's usage over the default range: the gateway's last seven
    // UTC days.
    click(&c, "tr[data-key='pro-1'] button.chart-key").await;
    wait_text(&c, "#usage-table tbody", |t| t.contains("2026-12-0")).await;
    let range = c
        .execute(
            "return [document.getElementById('usage-start').value, \
             document.getElementById('usage-end').value];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(range, json!(["2026-11-30", "2026-12-06"]));
    let table = rows(&c, "#usage-table").await;
    let days: Vec<&str> = table.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        days,
        [
            "2026-11-30",
            "2026-12-01",
            "2026-12-02",
            "2026-12-03",
            "2026-12-04",
            "2026-12-05",
            "2026-12-06"
        ]
    );
    assert_eq!(table[6], ["2026-12-06", "2", "99,998"]);
    assert_eq!(wait_text(&c, "#status", |_| true).await, "");

    // The account's, over the same range.
    c.find(Locator::Id("usage-subject"))
        .await
        .unwrap()
        .select_by_value("account:acme")
        .await
        .unwrap();
    click(&c, "#usage-form button[type=submit]").await;
    wait_text(&c, "#usage-caption", |t| t.starts_with("account acme")).await;
    let table = rows(&c, "#usage-table").await;
    assert_eq!(table.len(), 7);
    assert_eq!(table[0], ["2026-11-30", "0", "50,000"]);
    assert_eq!(table[6], ["2026-12-06", "3", "49,997"]);
    assert_eq!(wait_text(&c, "#status", |_| true).await, "");
    screenshot(&c, "9-usage-ahead-of-utc").await;

    // What the page asked for: the gateway's UTC days, for both reports.
    assert_eq!(
        fetched(&c, "/usage?").await,
        [
            "usage?plan=pro&start=2026-11-30&end=2026-12-06&key=pro-1",
            "accounts/acme/usage?start=2026-11-30&end=2026-12-06",
        ]
    );
    let errors = console_errors(&c).await;
    assert!(errors.is_empty(), "the browser logged errors: {errors:?}");
    c.close().await.unwrap();
}
