"""The Mews connection as a user meets it: the real Airflow 3.3 UI in a real (headless) browser.

Starts the real Airflow API server with its React UI on loopback (own throw-away home and
SQLite DB, simple auth manager with everybody admin, ``[core] test_connection = Enabled``),
then drives Debian's Chromium with Playwright: Admin > Connections > Add Connection, type
"Mews", checks the form the provider declares (``get_provider_info()``'s ``conn-fields`` and
``ui-field-behaviour``), fills it for the local sandbox, saves, presses Test and reads the
toast; then the same with a wrong access token, which must show the sandbox's 401.

Screenshots and the API server log go to ``.artifacts/ui/``; the docs' copies in
``docs/img/`` are rewritten only by ``make screenshots`` (``MEWS_UPDATE_SCREENSHOTS=1``), so a
test run leaves the work tree clean.

Needs Debian's ``chromium`` (``.ci/system-deps.sh``) and the ``playwright`` Python package.
Without them the test is skipped and listed with how to enable it; in CI
(``MEWS_REQUIRE_ALL_TESTS=1`` or ``CI``) it fails instead. Playwright never downloads a
browser here: it is pointed at Debian's ``chromium`` (or ``MEWS_UI_CHROMIUM``).

Airflow <= 3.3.2 bug worked around, in the server only: the UI's Test button posts
``port: Number(connection.port)``, i.e. ``0`` for a connection without port, and the API
then answers 400 "The host or port to test differs from the stored connection" for every
port-less connection (apache/airflow#73298, fixed upstream in the API). When the installed
Airflow still has that bug, the server is started with exactly that upstream fix applied
(0 and blank port compare equal); everything else is the unmodified Airflow.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import needs

from airflow_provider_mews.testing import DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN, MewsSandbox

try:
    from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright
except ImportError as exc:  # reported by the browser fixture: skipped, or failed in CI
    PLAYWRIGHT_IMPORT_ERROR: ImportError | None = exc
else:
    PLAYWRIGHT_IMPORT_ERROR = None
    expect.set_options(timeout=15_000)  # 2 shared CPU cores: leave slack for a loaded machine

ROOT = Path(__file__).resolve().parents[2]
DOCS_IMG = ROOT / "docs" / "img"
UPDATE_SCREENSHOTS = os.environ.get("MEWS_UPDATE_SCREENSHOTS", "0") not in ("", "0")
ARTIFACTS = Path(os.environ.get("MEWS_TEST_ARTIFACTS", ROOT / ".artifacts")) / "ui"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
WRONG_ACCESS_TOKEN = "0BADC0DE0BADC0DE0BADC0DE0BADC0DE-0BADC0DE0BADC0DE0BADC0DE0BADC0D"
CLIENT_NAME = "airflow-provider-mews UI test"
UI_TIMEOUT_MS = 20_000
HIDE_BACKDROP = "[data-scope=dialog][data-part=backdrop] { display: none !important; }"

# Runs the real `airflow` CLI; first applies apache/airflow#73298 if this Airflow lacks it.
SERVER_LAUNCHER = """
import sys
from airflow.api_fastapi.core_api.routes.public import connections as routes
if not routes._same_endpoint(0, None):
    original = routes._same_endpoint
    def _same_endpoint(requested, stored):
        return original(None if requested == 0 else requested, None if stored == 0 else stored)
    routes._same_endpoint = _same_endpoint
    print("mews UI test: applied apache/airflow#73298 (Test button on port-less connections)", flush=True)
from airflow.__main__ import main
sys.argv = ["airflow", *sys.argv[1:]]
sys.exit(main())
"""


def _chromium() -> str:
    path = os.environ.get("MEWS_UI_CHROMIUM") or shutil.which("chromium") or ""
    if not (Path(path).is_file() and os.access(path, os.X_OK)):
        needs(
            "Chromium",
            "install Debian's chromium (`apt-get install chromium`, done by .ci/system-deps.sh as root) "
            "or set MEWS_UI_CHROMIUM=/path/to/chromium",
        )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log_tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _stop_server(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM, wait for uvicorn's orderly shutdown, then SIGKILL: after "Finished server process"
    the interpreter spends several CPU seconds finalizing, which nothing here needs."""
    proc.terminate()
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        if "Finished server process" in log.read_text(errors="replace"):
            break
        time.sleep(0.1)  # polling interval
    try:
        proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def airflow_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a real Airflow API server + UI, with its own home and metadata DB."""
    home = tmp_path_factory.mktemp("airflow-ui-home")
    (home / "dags").mkdir()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__TEST_CONNECTION="Enabled",
        AIRFLOW__CORE__AUTH_MANAGER="airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
        AIRFLOW__API__SERVER_TYPE="uvicorn",
    )
    airflow_bin = str(Path(sys.executable).parent / "airflow")
    migrate_log = ARTIFACTS / "db-migrate.log"
    with migrate_log.open("w") as out:
        done = subprocess.run([airflow_bin, "db", "migrate"], env=env, stdout=out, stderr=subprocess.STDOUT)
    assert done.returncode == 0, f"airflow db migrate failed:\n{_log_tail(migrate_log)}"

    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    server_log = ARTIFACTS / "api-server.log"
    server_cmd = [
        sys.executable,
        "-c",
        SERVER_LAUNCHER,
        "api-server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with server_log.open("w") as out:
        proc = subprocess.Popen(
            [*server_cmd, "--workers", "1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"airflow api-server exited with {proc.returncode}:\n{_log_tail(server_log)}")
            try:
                with urllib.request.urlopen(f"{base_url}/api/v2/monitor/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"airflow api-server not healthy after 90 s:\n{_log_tail(server_log)}")
            time.sleep(0.25)  # polling interval of the readiness wait, not a fixed delay
        yield base_url
    finally:
        _stop_server(proc, server_log)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if PLAYWRIGHT_IMPORT_ERROR is not None:
        needs(
            "playwright",
            f"`pip install playwright` (the dev extra; {PLAYWRIGHT_IMPORT_ERROR}); never `playwright install`: "
            "the test uses Debian's chromium",
        )
    executable = _chromium()
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1100}, locale="en-US")
    context.set_default_timeout(UI_TIMEOUT_MS)
    pg = context.new_page()
    try:
        yield pg
    finally:
        context.close()


def _field(dialog: Locator, label: str) -> Locator:
    """The input of the form field labelled ``label``.

    The 3.3 UI renders extra fields with a ``<label for>`` that does not match the input's
    id, so ``get_by_label`` cannot find them; the field group holding the label can.
    """
    label_el = dialog.page.locator("label").get_by_text(label, exact=True)
    return dialog.get_by_role("group").filter(has=label_el).locator("input").first


def _open_add_mews_form(page: Page, conn_id: str) -> Locator:
    page.get_by_role("button", name="Add Connection").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_role("heading", name="Add Connection")).to_be_visible()
    dialog.get_by_label("Connection ID").fill(conn_id)
    dialog.get_by_role("combobox").fill("Mews")
    page.get_by_role("option", name="Mews", exact=True).click()
    expect(dialog.get_by_text("Platform address", exact=True)).to_be_visible()
    return dialog


def _fill_standard(dialog: Locator, host: str, access_token: str) -> None:
    dialog.get_by_label("Platform address").fill(host)
    dialog.get_by_label("Access token").fill(access_token)


def _open_extra(dialog: Locator) -> None:
    extra = dialog.get_by_role("button", name="Extra Fields", exact=True)
    if extra.get_attribute("aria-expanded") != "true":
        extra.click()
    expect(extra).to_have_attribute("aria-expanded", "true")


def _fill_extra(dialog: Locator, client_token: str) -> None:
    _open_extra(dialog)
    _field(dialog, "Client token").fill(client_token)
    _field(dialog, "Client").fill(CLIENT_NAME)
    _field(dialog, "Timeout (seconds)").fill("10")


def _save(page: Page, dialog: Locator, conn_id: str) -> Locator:
    dialog.get_by_role("button", name="Save").click()
    expect(dialog).to_be_hidden()
    row = page.get_by_role("row").filter(has=page.get_by_role("cell", name=conn_id, exact=True))
    expect(row).to_be_visible()
    expect(row.get_by_role("cell", name="mews", exact=True)).to_be_visible()
    return row


def _press_test(page: Page, row: Locator, title: str) -> tuple[Locator, dict[str, Any]]:
    """Press the row's Test button; the API's answer and the toast titled ``title``."""
    with page.expect_response(lambda r: r.url.endswith("/api/v2/connections/test")) as answer:
        row.get_by_role("button", name="Test Connection").click()
    response = answer.value
    assert response.status == 200, f"POST /connections/test answered {response.status}: {response.text()}"
    toast = page.locator("[data-scope=toast][data-part=root]").filter(has_text=title)
    expect(toast).to_be_visible()
    return toast, response.json()


def _save_png(name: str, data: bytes) -> None:
    """Into .artifacts/ui; into docs/img (the docs' and README's) only for `make screenshots`."""
    for folder in (DOCS_IMG, ARTIFACTS) if UPDATE_SCREENSHOTS else (ARTIFACTS,):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def _side_by_side(browser: Browser, images: list[bytes]) -> bytes:
    """One PNG showing ``images`` next to each other (the form's two accordion sections)."""
    tags = "".join(f'<img src="data:image/png;base64,{base64.b64encode(i).decode()}">' for i in images)
    pg = browser.new_page(viewport={"width": 2000, "height": 1200})
    try:
        pg.set_content(
            '<body style="margin:0;background:#fff">'
            '<div id="c" style="display:inline-flex;gap:24px;padding:12px;align-items:flex-start">'
            f"{tags}</div>"
            "</body>"
        )
        pg.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        return pg.locator("#c").screenshot()
    finally:
        pg.close()


def test_mews_connection_form_and_test_button(
    browser: Browser, airflow_ui: str, mews_sandbox: MewsSandbox, page: Page
) -> None:
    page.goto(f"{airflow_ui}/")
    page.get_by_role("button", name="Admin").click()
    page.get_by_role("menuitem", name="Connections").click()
    expect(page).to_have_url(re.compile(r"/connections$"))

    # -- the form the provider declares --
    dialog = _open_add_mews_form(page, "mews_ui_demo")
    for label in ("Platform address", "Access token"):  # relabelled host and password
        expect(dialog.get_by_label(label)).to_be_visible()
    expect(dialog.get_by_label("Platform address")).to_have_attribute("placeholder", re.compile("api.mews"))
    expect(dialog.get_by_label("Access token")).to_have_attribute("type", "password")
    for name in ("schema", "port", "login"):  # standard fields a Mews connection does not use
        expect(dialog.locator(f"input[name={name}]")).to_be_hidden()
    for label in ("Host", "Password", "Schema", "Port", "Login"):
        expect(dialog.get_by_text(label, exact=True)).to_be_hidden()
    _fill_standard(dialog, mews_sandbox.url, DEMO_ACCESS_TOKEN)
    standard_png = dialog.screenshot(style=HIDE_BACKDROP, animations="disabled")

    _open_extra(dialog)
    for label in ("Client token", "Client", "Chain id", "Timeout (seconds)"):
        expect(dialog.locator("label").get_by_text(label, exact=True)).to_be_visible()
        expect(_field(dialog, label)).to_be_editable()
    expect(_field(dialog, "Client token")).to_have_attribute("type", "password")
    expect(_field(dialog, "Chain id")).not_to_have_attribute("type", "password")
    expect(dialog.get_by_text("leave empty otherwise")).to_be_visible()  # extra fields' help texts
    expect(dialog.get_by_text("identifying the integration")).to_be_visible()
    _fill_extra(dialog, DEMO_CLIENT_TOKEN)
    extra_png = dialog.screenshot(style=HIDE_BACKDROP, animations="disabled")
    _save_png("connection-form.png", _side_by_side(browser, [standard_png, extra_png]))

    # -- save, Test: success read from the UI --
    row = _save(page, dialog, "mews_ui_demo")
    before = mews_sandbox.stats().get("requests:configuration/get", 0)
    toast, answer = _press_test(page, row, "Test Connection Successful")
    assert answer["status"] is True, answer
    expect(toast).to_contain_text("Connected to Mews at")
    expect(toast).to_contain_text(mews_sandbox.url)
    expect(toast).to_contain_text(CLIENT_NAME)  # the Client extra field reached the hook
    assert mews_sandbox.stats().get("requests:configuration/get", 0) == before + 1
    _save_png("test-success.png", page.screenshot(animations="disabled"))

    # -- same with a wrong access token: a clear failure with the 401 --
    dialog = _open_add_mews_form(page, "mews_ui_wrong_token")
    _fill_standard(dialog, mews_sandbox.url, WRONG_ACCESS_TOKEN)
    _fill_extra(dialog, DEMO_CLIENT_TOKEN)
    row = _save(page, dialog, "mews_ui_wrong_token")
    toast, answer = _press_test(page, row, "Test Connection Failed")
    assert answer["status"] is False, answer
    expect(toast).to_contain_text("401")
    expect(toast).to_contain_text("Invalid ClientToken or AccessToken")
    text = toast.inner_text()
    for secret in (WRONG_ACCESS_TOKEN, DEMO_CLIENT_TOKEN, DEMO_ACCESS_TOKEN):
        assert secret not in text, "a token is shown in the Test result"
    assert mews_sandbox.stats().get("status:401", 0) >= 1
    _save_png("test-failure.png", page.screenshot(animations="disabled"))
