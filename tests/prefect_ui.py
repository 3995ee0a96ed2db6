"""Driving the Prefect server's UI (3.9, its default React UI under /v2) in Debian's
headless Chromium with Playwright, as a user would: no API shortcuts for what the
user clicks. Playwright's own browser download is never used."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, Response, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
# Headless, as root, on a machine whose outside network is closed: no sandbox, and none
# of Chromium's background connections (which would be refused, many at a time).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEP_TIMEOUT_MS = 30_000
LOAD_ATTEMPTS = 3
QUIET_SECONDS = 2.0


def _network_state() -> tuple[list[tuple[str, str]], str]:
    """Each interface with its operational state, and every IPv6 address (with its flags)."""
    interfaces = Path("/sys/class/net")
    try:
        states = [(link.name, (link / "operstate").read_text().strip()) for link in sorted(interfaces.iterdir())]
    except FileNotFoundError:  # an interface went away while being read: that is a change too
        states = [("(changing)", str(time.monotonic()))]
    addresses = Path("/proc/net/if_inet6")
    return states, addresses.read_text() if addresses.exists() else ""


def wait_for_quiet_network(timeout: float = 30.0) -> None:
    """Until the host's interfaces and IPv6 addresses have not changed for QUIET_SECONDS.

    The bed's containers come and go with veth interfaces, whose IPv6 link-local
    addresses appear a moment after them; Chromium aborts every request in flight when
    it sees the host's addresses change (net::ERR_NETWORK_CHANGED), which leaves a page
    that was loading blank."""
    deadline = time.monotonic() + timeout
    last, since = _network_state(), time.monotonic()
    while time.monotonic() - since < QUIET_SECONDS:
        assert time.monotonic() < deadline, f"the host's network kept changing for {timeout:g} s"
        time.sleep(0.1)  # polling the kernel's view of the interfaces (observed state)
        now = _network_state()
        if now != last:
            last, since = now, time.monotonic()


@contextmanager
def browser_page(record: list[str]) -> Iterator[Page]:
    """A page in a fresh headless Chromium; what the page logs, and every request that
    failed or got an error status, is appended to `record` (for a failing test's message)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (./dev setup does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.on("console", lambda message: record.append(f"console {message.type}: {message.text[:300]}"))
            page.on("pageerror", lambda error: record.append(f"page error: {error}"))
            page.on("requestfailed", lambda request: record.append(f"failed: {request.url} {request.failure}"))
            page.on("response", lambda answer: answer.ok or record.append(f"{answer.status}: {answer.url}"))
            yield page
        finally:
            browser.close()


def open_ui(page: Page, url: str, ready: Locator, record: list[str]) -> None:
    """Load `url` until `ready` shows. If the browser aborted requests of the page because
    the host's network changed (see wait_for_quiet_network), wait for quiet and load it
    again, at most LOAD_ATTEMPTS times; any other problem fails at `ready`'s own wait."""
    for _ in range(LOAD_ATTEMPTS):
        wait_for_quiet_network()
        mark = len(record)
        page.goto(url, wait_until="domcontentloaded")
        deadline = time.monotonic() + STEP_TIMEOUT_MS / 1000
        while time.monotonic() < deadline and not ready.is_visible():
            if any("ERR_NETWORK_CHANGED" in line for line in record[mark:]):
                break
            page.wait_for_timeout(100)  # polling the page (observed state); lets Playwright process events
        else:
            break
    expect(ready).to_be_visible()


def start_custom_run(page: Page, server: str, deployment_id: str, tag: str, record: list[str]) -> str:
    """Deployment page -> Run -> Custom run -> type the tag -> Submit. `server` is the
    server's root URL. Returns the ID of the run the UI created."""
    ui = f"{server.rstrip('/')}/v2"
    run = page.get_by_role("button", name="Run", exact=True)
    open_ui(page, f"{ui}/deployments/deployment/{deployment_id}", run, record)
    run.click()
    page.get_by_role("menuitem", name="Custom run").click()
    page.wait_for_url(re.compile(rf"/deployments/deployment/{deployment_id}/run"))
    expect(page.get_by_role("heading", name="Parameters")).to_be_visible()

    # `tag: str | None` renders as a switch between "str" and "None" ("None" chosen):
    # choosing "str" shows its (unlabelled) text box, inside the field labelled "tag".
    label = page.get_by_text(re.compile(r"^tag(\s*\(Optional\))?$"))
    field = page.locator("div").filter(has=label).filter(has=page.get_by_role("tablist")).last
    field.get_by_role("tab", name="str", exact=True).click()
    box = field.get_by_role("tabpanel", name="str").get_by_role("textbox")
    box.fill(tag)
    expect(box).to_have_value(tag)

    def created(response: Response) -> bool:
        request = response.request
        return request.method == "POST" and request.url.endswith(f"/deployments/{deployment_id}/create_flow_run")

    with page.expect_response(created) as answer:
        page.get_by_role("button", name="Submit", exact=True).click()
    response = answer.value
    assert response.status == 201, f"the UI's create_flow_run failed: {response.status} {response.text()[:500]}"
    run_id = str(response.json()["id"])
    # The confirmation the user sees links to that run.
    link = page.get_by_role("link", name="View run")
    expect(link).to_have_attribute("href", re.compile(rf"/runs/flow-run/{run_id}$"))
    return run_id
