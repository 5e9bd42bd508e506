"""A newcomer's account in the browser: the landing page's live figures, sign up, log out, log in, and a
forgotten password reset through the link mailed to them (the embedded mail folder)."""

from __future__ import annotations

import re
import time

from tests.e2e.browser.conftest import shoot


def _mail_link(cluster, *, to: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in sorted((cluster.var_dir / "mail").glob("*.log")):
            text = message.read_text(errors="replace")
            if to in text and (link := re.search(r"http://\S+/accounts/password/reset/key/\S+", text)):
                return link.group(0)
        time.sleep(0.2)
    raise AssertionError(f"no password reset mail to {to} in {cluster.var_dir / 'mail'}")


def test_a_newcomer_signs_up_logs_out_logs_in_and_resets_a_forgotten_password(cluster, browse):
    page = browse()
    page.goto("/")
    assert page.get_by_role("heading", level=1).inner_text().startswith("AI compute on idle devices")
    assert page.locator(".stats .stat").count() == 6
    shoot(page, "landing")

    page.get_by_role("link", name="Sign up").first.click()
    page.get_by_label("Username").fill("newcomer")
    page.get_by_label("Email").fill("newcomer@example.org")
    page.get_by_label("Password:", exact=True).fill("a long enough passphrase 41")
    page.get_by_label("Password (again)").fill("a long enough passphrase 41")
    shoot(page, "signup")
    page.get_by_role("button", name="Sign Up").click()
    page.wait_for_url("**/jobs/")
    assert page.locator(".who").inner_text().startswith("newcomer")

    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(f"{cluster.url}/")
    assert page.get_by_role("banner").get_by_role("link", name="Log in").is_visible()

    page.goto("/accounts/login/")
    page.get_by_label("Username or email:").fill("newcomer")
    page.get_by_label("Password:", exact=True).fill("not the password")
    page.get_by_role("button", name="Sign In").click()
    assert "not correct" in page.locator(".account").inner_text()
    shoot(page, "login-error")

    page.get_by_role("link", name="Forgot your password?").click()
    page.get_by_label("Email").fill("newcomer@example.org")
    page.get_by_role("button", name="Reset My Password").click()
    page.wait_for_url("**/password/reset/done/")
    page.goto(_mail_link(cluster, to="newcomer@example.org"))
    page.get_by_label("New Password:", exact=True).fill("another long passphrase 42")
    page.get_by_label("New Password (again)").fill("another long passphrase 42")
    page.get_by_role("button", name="Change Password").click()
    page.wait_for_url("**/password/reset/key/done/")

    # by keyboard alone: Tab from the top of the page to the login field, type, Tab, type, Enter
    page.goto("/accounts/login/")
    for _ in range(12):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "id_login":
            break
    assert page.evaluate("document.activeElement.id") == "id_login"
    page.keyboard.type("newcomer@example.org")
    page.keyboard.press("Tab")
    page.keyboard.type("another long passphrase 42")
    page.keyboard.press("Enter")
    page.wait_for_url("**/jobs/")


PHONE = {"width": 390, "height": 844}
# the innermost elements whose right edge passes the screen's (what pushes the page sideways)
WIDER_THAN_SCREEN = """[...document.querySelectorAll('body *')]
  .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1 && !(e.parentElement && e.parentElement.closest('.table-wrap')))
  .filter(e => ![...e.children].some(c => c.getBoundingClientRect().right > window.innerWidth + 1))
  .slice(0, 5).map(e => e.tagName.toLowerCase() + (e.className ? '.' + e.className : '') + ': ' +
                   (e.textContent || '').trim().slice(0, 40))"""
PAGES = ["/", "/jobs/", "/jobs/new/", "/funds/", "/funds/statement/", "/devices/", "/devices/enrol/", "/earnings/",
         "/payout/", "/tokens/"]


def test_every_page_reads_on_a_phone_without_sideways_scrolling(cluster, browse):
    cluster.account("phone-user")
    page = browse(viewport=PHONE)
    page.goto("/accounts/login/")
    page.get_by_label("Username or email:").fill("phone-user")
    page.get_by_label("Password:", exact=True).fill(cluster.passwords["phone-user"])
    page.get_by_role("button", name="Sign In").click()
    page.wait_for_url("**/jobs/")

    for path in PAGES:
        page.goto(path)
        assert page.get_by_role("heading", level=1).count() == 1, path
        fits = page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert fits, f"{path} overflows sideways: {page.evaluate(WIDER_THAN_SCREEN)}"
        shoot(page, "phone" + ("-" + path.strip("/").replace("/", "-") if path != "/" else "-landing"))
