"""pytest configuration for the headless-browser notebook tests (tests/browser)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "browser: runs notebooks in JupyterLab in headless Chromium "
        "(needs scripts/setup-browser.sh; deselect with -m 'not browser', "
        "skip with QLORA_SKIP_BROWSER=1)",
    )
