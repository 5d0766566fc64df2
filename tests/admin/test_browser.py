"""The admin page in a real headless browser (Debian's Chromium and chromedriver, driven by
Selenium, JavaScript switched off): sign in, see the accounts, re-authorise an account by
device code and by signing in in the browser (auth code with PKCE, through the fake identity
platform's page), add a device password and revoke it, and see that device's next login fail.

The accounts page's screenshot goes to $XOAUTH2_PROXY_ARTIFACTS (CI keeps it) and, with
XOAUTH2_PROXY_UPDATE_DOCS=1 in a checkout, to docs/admin-accounts.png (the README shows it).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from proxy.demo.process import DemoUpstream
from tests.admin.adminenv import ADMIN_PASSWORD, PASSWORD, PHONE, AdminEnv, start_admin
from tests.proxyenv import USER, fresh_login_reply

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("XOAUTH2_PROXY_REQUIRE_REAL_SERVERS"):
        raise RuntimeError("chromium and chromium-driver are required (apt-get install -y "
                           "chromium chromium-driver)")
    pytest.skip("chromium and chromium-driver are not installed", allow_module_level=True)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs"


@contextmanager
def browser(profile: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                # the fake identity platform's certificate is from the test's own CA
                "--ignore-certificate-errors",
                f"--user-data-dir={profile}", "--window-size=1000,1100"):
        options.add_argument(arg)
    options.add_experimental_option(  # the page must work without JavaScript
        "prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(options=options, service=Service(str(DRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def save_screenshot(driver: WebDriver, tmp_path: Path) -> None:
    artifacts = Path(os.environ.get("XOAUTH2_PROXY_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    png = driver.get_screenshot_as_png()
    (artifacts / "admin-accounts.png").write_bytes(png)
    if os.environ.get("XOAUTH2_PROXY_UPDATE_DOCS") and DOCS.is_dir():
        (DOCS / "admin-accounts.png").write_bytes(png)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def session(env: AdminEnv, upstream: DemoUpstream, tmp_path: Path) -> None:
    imap = env.proxy.ports["imap"]
    wait = lambda d: WebDriverWait(d, 60, poll_frequency=0.2)  # noqa: E731
    with browser(tmp_path / "chromium-profile") as d:
        d.get(f"{env.url}/")
        assert d.title.startswith("Sign in")
        d.find_element(By.ID, "password").send_keys(ADMIN_PASSWORD)
        d.find_element(By.CSS_SELECTOR, "main form button").click()
        wait(d).until(lambda d: d.title.startswith("Accounts"))
        body = d.find_element(By.TAG_NAME, "main").text
        assert USER in body and PHONE in body and "ok" in body
        assert "bob@contoso.example" in body and "no token file" in body
        save_screenshot(d, tmp_path)

        # Re-authorise by device code: the page shows the code and follows the sign-in.
        d.find_element(By.LINK_TEXT, f"Re-authorise {USER}").click()
        d.find_element(By.ID, "password").send_keys(PASSWORD)  # unlocks the token file
        d.find_element(By.CSS_SELECTOR, "main form button").click()
        code = wait(d).until(lambda d: d.find_elements(By.ID, "user-code"))[0].text
        upstream.approve(code, USER)
        wait(d).until(lambda d: d.find_elements(By.ID, "done"))
        assert fresh_login_reply(imap, USER, PASSWORD) == "OK"

        # Or sign in in this browser: off to the (fake) identity platform's page and back.
        upstream.revoke(USER, access_tokens=True, refresh_tokens=True)
        d.get(f"{env.url}/reauth/{USER}")
        d.find_element(By.CSS_SELECTOR, "button[value='browser']").click()
        wait(d).until(lambda d: d.find_elements(By.ID, "sign-in"))[0].click()
        # Scripts are off: the identity platform's page offers its form's button instead.
        wait(d).until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type='submit']"))[0].click()
        wait(d).until(lambda d: d.title.startswith("Signed in"))
        assert f"{USER} is authorised again" in d.find_element(By.ID, "done").text
        assert fresh_login_reply(imap, USER, PASSWORD) == "OK"

        # Add a device password (shown once), use it, revoke it: its next login fails.
        d.get(f"{env.url}/")
        d.find_element(By.CSS_SELECTOR, "details summary").click()
        d.find_element(By.ID, "label-1").send_keys("tablet")
        d.find_element(By.CSS_SELECTOR, "details form button").click()
        new = wait(d).until(lambda d: d.find_elements(By.CLASS_NAME, "new-password"))[0].text
        assert len(new) >= 20 and fresh_login_reply(imap, USER, new) == "OK"
        d.refresh()
        assert not d.find_elements(By.CLASS_NAME, "new-password")  # shown once
        d.find_element(By.CSS_SELECTOR, "button[value='tablet']").click()
        wait(d).until(lambda d: "Revoked the password of tablet" in d.page_source)
        assert "Invalid user name or local password" in fresh_login_reply(imap, USER, new)
        assert fresh_login_reply(imap, USER, PASSWORD) == "OK"


async def test_admin_page_in_a_browser(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    env = await start_admin(tmp_path, demo_upstream)
    try:
        await asyncio.to_thread(session, env, demo_upstream, tmp_path)
    finally:
        await env.proxy.daemon.stop(grace=1)
