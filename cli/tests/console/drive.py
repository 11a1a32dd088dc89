#!/usr/bin/env python3
"""Drives the `qmesh dev` web console in headless Chromium (Debian's `chromium` + `chromium-driver`)
with Selenium, for cli/tests/console.rs.

It opens every page, checks the figures shown against `qmesh get ... -o json` (retrying until they
agree: the console and `qmesh get` read the same stats at slightly different moments), proves the
page updates without a reload, peeks the dead-letter queue, clicks Redrive and accepts the
confirmation dialog, saves a screenshot of each page, and fails on any browser console error.
It writes what it saw to --report as JSON and exits 0 only if everything held.

Exit codes: 0 ok, 1 a check failed, 2 Selenium or Chromium is missing.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError as error:  # pragma: no cover - the point is the message
    print(
        f"selenium is not installed for {sys.executable} ({error}): "
        "pip install -r cli/tests/console/requirements.txt (hack/test.sh does it in its venv)",
        file=sys.stderr,
    )
    sys.exit(2)

TIMEOUT = 40


class CheckFailed(Exception):
    pass


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True, help="the console, e.g. http://127.0.0.1:7080/")
    p.add_argument("--qmesh", required=True, help="the qmesh binary")
    p.add_argument("--control-plane", required=True)
    p.add_argument("--publisher", required=True, help="gRPC address of the publishing sidecar")
    p.add_argument("--consumer", required=True, help="gRPC address of billing's consumer sidecar")
    p.add_argument("--live", type=int, default=60, help="messages published while the page is open")
    p.add_argument("--live-rate", type=int, default=10, help="…at this rate (msg/s)")
    p.add_argument("--queue", required=True, help="a queue with a dead-letter queue")
    p.add_argument("--dlq", required=True, help="its dead-letter queue")
    p.add_argument("--dead-letters", type=int, required=True, help="how many it holds")
    p.add_argument("--screenshots", required=True, help="folder for the PNGs")
    p.add_argument("--report", required=True, help="where to write what was seen (JSON)")
    return p.parse_args()


def qmesh(args, *rest):
    out = subprocess.run([args.qmesh, *rest], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise CheckFailed(f"qmesh {' '.join(rest)} failed ({out.returncode}): {out.stderr}")
    return out.stdout


def get(args, kind):
    return json.loads(qmesh(args, "get", kind, "-o", "json", "--control-plane", args.control_plane))


def peek(args):
    text = qmesh(args, "dlq", "peek", args.dlq, "--json", "--count", "1000", "--addr", args.publisher)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def start_browser():
    chromium = os.environ.get("QMESH_CHROMIUM", "/usr/bin/chromium")
    driver = os.environ.get("QMESH_CHROMEDRIVER", "/usr/bin/chromedriver")
    missing = [p for p in (chromium, driver) if not (os.path.isfile(p) or shutil.which(p))]
    if missing:
        print(
            f"headless Chromium is missing ({', '.join(missing)} not found): "
            "apt-get install chromium chromium-driver (hack/test.sh does), "
            "or set QMESH_CHROMIUM / QMESH_CHROMEDRIVER",
            file=sys.stderr,
        )
        sys.exit(2)
    # Never let Selenium Manager look for (and download) a browser or driver.
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1440,1000",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-features=Translate,MediaRouter,OptimizationHints",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(service=Service(driver), options=options)
    except WebDriverException as error:
        print(f"cannot start headless Chromium with {driver}: {error}", file=sys.stderr)
        sys.exit(2)


class Console:
    def __init__(self, args, browser):
        self.args = args
        self.browser = browser
        self.log = []
        self.pages = {}
        self.screenshots = []

    def collect_log(self, page):
        for entry in self.browser.get_log("browser"):
            entry["page"] = page
            self.log.append(entry)

    def updates(self):
        value = self.browser.execute_script("return document.body.dataset.updates || '0'")
        return int(value)

    def wait(self, what, check, timeout=TIMEOUT):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            try:
                result = check()
                if result:
                    return result
            except StaleElementReferenceException:
                pass
            except CheckFailed as error:
                last = str(error)
            time.sleep(0.25)
        raise CheckFailed(f"timed out waiting for {what}" + (f": {last}" if last else ""))

    def open_page(self, name):
        self.click(f'#nav a[data-page="{name}"]')
        self.wait(f"page {name}", lambda: self.browser.execute_script("return document.body.dataset.page") == name)
        before = self.updates()
        self.wait(f"a live update on {name}", lambda: self.updates() > before)

    def screenshot(self, name):
        path = os.path.join(self.args.screenshots, f"{name}.png")
        self.browser.save_screenshot(path)
        self.screenshots.append(path)

    def click(self, css):
        """Clicks what `css` selects now (the tables are redrawn as figures arrive: find it afresh
        until a click lands)."""

        def once():
            self.browser.find_element(By.CSS_SELECTOR, css).click()
            return True

        self.wait(f"a click on {css}", once)

    def rows(self, css):
        """The data-col cells of every row `css` selects, as text, read in one go in the page."""
        return self.browser.execute_script(
            """
            return [...document.querySelectorAll(arguments[0])].map((tr) =>
              Object.fromEntries([...tr.querySelectorAll("td[data-col]")].map(
                (td) => [td.dataset.col, td.innerText.trim()])));
            """,
            css,
        )

    def cells(self, table, key):
        """The data-col cells of the row of `key` in `table`, as text."""
        rows = self.rows(f'#{table} tbody tr[data-key="{key}"]')
        if not rows:
            raise CheckFailed(f"no row {key} in #{table}")
        return rows[0]

    def card(self, stat):
        return self.browser.find_element(By.CSS_SELECTOR, f'.card[data-stat="{stat}"] .value').text.strip()

    def matches(self, what, expected, shown):
        wrong = {k: (v, shown.get(k)) for k, v in expected.items() if shown.get(k) != v}
        if wrong:
            raise CheckFailed(f"{what}: (qmesh get, console) differ: {wrong}")
        return True


def rate_sum(rows, column):
    return f"{sum(float(r[column]) for r in rows):.1f}"


def check_overview(c):
    def agree():
        queues = get(c.args, "queues")
        subs = get(c.args, "subscriptions")
        sidecars = get(c.args, "sidecars")
        dlqs = {q["dead-letter-queue"] for q in queues if q["dead-letter-queue"] != "-"}
        expected = {
            "backlog": str(sum(int(q["backlog"]) for q in queues)),
            "dead_letters_waiting": str(sum(int(q["backlog"]) for q in queues if q["name"] in dlqs)),
            "sidecars_up": f"{sum(s['connected'] == 'true' for s in sidecars)} / {len(sidecars)}",
            "publish_rate": rate_sum(queues, "publish/s"),
            "ack_rate": rate_sum(subs, "acks/s"),
            "in_flight": str(sum(int(s["in-flight"]) for s in subs)),
        }
        shown = {k: c.card(k) for k in expected}
        c.matches("overview cards", expected, shown)
        return shown

    c.pages["overview"] = c.wait("the overview to match qmesh get", agree)
    c.screenshot("overview")
    c.collect_log("overview")


def check_live_update(c):
    """Traffic while the page is open shows up without a reload: a consumer acks what a publisher
    sends at a steady rate (the charts get something to draw)."""
    c.open_page("queues")
    key = f"default/{c.args.queue}"
    before = c.cells("queues-table", key)
    c.browser.execute_script("window.__qmeshSamePage = 'still here'")
    n = c.args.live
    consumer = subprocess.Popen(
        [c.args.qmesh, "sub", "billing", "--count", str(n), "--addr", c.args.consumer],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        qmesh(
            c.args, "pub", c.args.queue, "live update", "--id", "live", "--count", str(n),
            "--rate", str(c.args.live_rate), "--addr", c.args.publisher,
        )
        _, stderr = consumer.communicate(timeout=60)
    finally:
        if consumer.poll() is None:
            consumer.kill()
    if consumer.returncode != 0:
        raise CheckFailed(f"qmesh sub billing --count {n} failed: {stderr}")
    c.wait(
        f"{key} to show {n} more published without a reload",
        lambda: int(c.cells("queues-table", key)["published_total"]) >= int(before["published_total"]) + n,
    )
    same = c.browser.execute_script("return window.__qmeshSamePage")
    if same != "still here":
        raise CheckFailed("the page was reloaded")
    c.pages["live_update"] = {"queue": key, "before": before, "published": n, "acked_by_billing": n}


def check_queues(c):
    c.open_page("queues")

    def agree():
        for q in get(c.args, "queues"):
            expected = {
                "publishers": q["publishers"],
                "subscriptions": q["subscriptions"],
                "backlog": q["backlog"],
                "published_total": q["published"],
                "publish_rate": q["publish/s"],
                "dead_letter_queue": q["dead-letter-queue"],
            }
            shown = c.cells("queues-table", f"default/{q['name']}")
            c.matches(f"queue {q['name']}", expected, shown)
            # An age grows between the two reads: both say whether one is owed, in the same form.
            if (q["oldest"] == "-") != (shown["oldest_age"] == "–"):
                raise CheckFailed(f"queue {q['name']}: oldest {shown['oldest_age']!r}, qmesh get {q['oldest']!r}")
        return True

    c.wait("the queues page to match qmesh get queues", agree)
    c.pages["queues"] = [c.cells("queues-table", f"default/{q['name']}") for q in get(c.args, "queues")]
    c.screenshot("queues")
    c.collect_log("queues")


def check_subscriptions(c):
    c.open_page("subscriptions")

    def agree():
        for s in get(c.args, "subscriptions"):
            expected = {
                "queue": s["queue"],
                "mode": s["mode"],
                "consumers": s["consumers"],
                "backlog": s["backlog"],
                "in_flight": s["in-flight"],
                "acked_total": s["acked"],
                "ack_rate": s["acks/s"],
                "dead_lettered_total": s["dead-lettered"],
            }
            c.matches(f"subscription {s['name']}", expected, c.cells("subscriptions-table", f"default/{s['name']}"))
        return True

    c.wait("the subscriptions page to match qmesh get subscriptions", agree)
    c.pages["subscriptions"] = [
        c.cells("subscriptions-table", f"default/{s['name']}") for s in get(c.args, "subscriptions")
    ]
    c.screenshot("subscriptions")
    c.collect_log("subscriptions")


def check_sidecars(c):
    c.open_page("sidecars")

    def agree():
        for s in get(c.args, "sidecars"):
            shown = c.cells("sidecars-table", f"default/{s['name']}")
            labels = " ".join(sorted(s["labels"].split(","))) if s["labels"] != "-" else ""
            expected = {
                "peer_address": s["peer"],
                "connected": "connected" if s["connected"] == "true" else "disconnected",
                "labels": labels,
            }
            shown["labels"] = " ".join(sorted(shown["labels"].split()))
            c.matches(f"sidecar {s['name']}", expected, shown)
        return True

    c.wait("the sidecars page to match qmesh get sidecars", agree)
    c.pages["sidecars"] = [c.cells("sidecars-table", f"default/{s['name']}") for s in get(c.args, "sidecars")]
    c.screenshot("sidecars")
    c.collect_log("sidecars")


def check_transactions(c):
    c.open_page("transactions")

    def agree():
        for t in get(c.args, "transactions"):
            shown = c.cells("transactions-table", f"default/{t['transaction']}")
            expected = {
                "transaction": t["transaction"],
                "outcome": t["outcome"],
                "decided_by": t["decided-by"],
                "messages": t["messages"],
                "checks": t["checks"],
                "sidecar": t["sidecar"],
            }
            c.matches(f"transaction {t['transaction']}", expected, shown)
        return len(get(c.args, "transactions")) > 0

    c.wait("the transactions page to match qmesh get transactions", agree)
    c.pages["transactions"] = c.rows("#transactions-table tbody tr")
    c.screenshot("transactions")
    c.collect_log("transactions")


def message_rows(c):
    return c.rows("#messages-table tbody tr.msg")


def check_dead_letters_and_redrive(c):
    c.open_page("dead-letters")
    key = f"default/{c.args.dlq}"
    n = c.args.dead_letters

    def held_is(want):
        shown = c.cells("dlq-table", key)
        if shown["held"] != want:
            raise CheckFailed(f"shown: {shown}")
        return True

    c.wait(f"{key} to show {n} held", lambda: held_is(str(n)))
    c.click(f'#dlq-table tbody tr[data-key="{key}"] button[data-action="peek"]')
    c.wait(f"{n} dead letters listed", lambda: len(message_rows(c)) == n)

    held = peek(c.args)
    expected_ids = sorted(h["headers"]["qmesh-original-id"] for h in held)
    shown = message_rows(c)
    for m in shown:
        for col, want in (("reason", "max deliveries (2) reached"), ("from", f"{c.args.queue}/billing"), ("deliveries", "2")):
            if m[col] != want:
                raise CheckFailed(f"dead letter {m['id']}: {col} is {m[col]!r}, not {want!r}")
    if sorted(m["original_id"] for m in shown) != expected_ids:
        raise CheckFailed(f"original ids: console {shown}, qmesh dlq peek {expected_ids}")
    if sorted(m["id"] for m in shown) != sorted(h["id"] for h in held):
        raise CheckFailed("message ids differ from qmesh dlq peek")
    # Every header, the reason among them, is one click away.
    c.click("#messages-table tbody tr.msg")
    text = c.wait(
        "the headers of a dead letter",
        lambda: c.browser.execute_script(
            "const d = document.querySelector('tr.msg-detail'); return d ? d.innerText : null"
        ),
    )
    for header in ("qmesh-dead-letter-reason", "qmesh-original-queue", "qmesh-last-error", "kind"):
        if header not in text:
            raise CheckFailed(f"the message detail lacks header {header}: {text}")
    c.pages["dead_letters"] = shown
    c.screenshot("dead-letters")
    c.collect_log("dead-letters")

    # Redrive: the button opens a confirmation dialog; accepting it redrives at every sidecar.
    c.click("#messages-redrive")
    dialog = c.wait(
        "the confirmation dialog",
        lambda: c.browser.execute_script("return document.getElementById('confirm-dialog').open")
        and c.browser.find_element(By.ID, "confirm-dialog"),
    )
    if str(n) not in dialog.text or c.args.dlq not in dialog.text:
        raise CheckFailed(f"the dialog does not say what it will redrive: {dialog.text}")
    c.screenshot("redrive-confirm")
    c.click("#confirm-ok")
    result = c.wait(
        "the redrive's result",
        lambda: (t := c.browser.find_element(By.ID, "redrive-result").text) and "Redrive of" in t and t,
    )
    if f"{n} republished" not in result or "0 failed" not in result:
        raise CheckFailed(f"unexpected redrive result: {result}")
    c.wait(f"{key} to show 0 held", lambda: held_is("0"))
    c.wait("the message list to empty", lambda: len(message_rows(c)) == 0)
    c.pages["redrive"] = {"result": result, "original_ids": expected_ids}
    c.screenshot("dead-letters-after-redrive")
    c.collect_log("dead-letters")


def main():
    args = parse_args()
    os.makedirs(args.screenshots, exist_ok=True)
    browser = start_browser()
    c = Console(args, browser)
    failure = None
    try:
        browser.get(args.url)
        c.wait("the first status", lambda: c.updates() >= 2)
        if browser.title != "qmesh console":
            raise CheckFailed(f"unexpected title {browser.title!r}")
        check_live_update(c)
        c.click('#nav a[data-page="overview"]')
        # Let the charts draw the traffic's rise and fall a while.
        time.sleep(4)
        check_overview(c)
        check_queues(c)
        check_subscriptions(c)
        check_sidecars(c)
        check_transactions(c)
        check_dead_letters_and_redrive(c)
        c.collect_log("end")
        errors = [e for e in c.log if e.get("level") == "SEVERE"]
        if errors:
            raise CheckFailed(f"browser console errors: {json.dumps(errors, indent=1)}")
    except (CheckFailed, WebDriverException) as error:
        failure = str(error)
        try:
            c.screenshot("failure")
            c.collect_log("failure")
        except WebDriverException:
            pass
    finally:
        browser.quit()
    with open(args.report, "w") as f:
        json.dump(
            {"failure": failure, "pages": c.pages, "screenshots": c.screenshots, "browser_log": c.log},
            f,
            indent=1,
        )
    if failure:
        print(f"console check failed: {failure}", file=sys.stderr)
        sys.exit(1)
    print(f"console ok: {len(c.screenshots)} screenshots, {len(c.log)} browser log entries, no errors")


if __name__ == "__main__":
    main()
