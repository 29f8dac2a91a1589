"""Nothing secret or site-specific in the repository: no credentials, account ids or non-loopback addresses."""

from __future__ import annotations

import ipaddress
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BINARY = {".png", ".jpg", ".jpeg", ".npz", ".h5", ".pb", ".gz", ".zip", ".ico"}
#: AWS's own documentation placeholder account id, used as such in the IAM tests.
PLACEHOLDER_ACCOUNT = "123456789012"

ACCESS_KEY = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
SECRET = re.compile(r"aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}")
ACCOUNT_ARN = re.compile(r"arn:aws:[a-z0-9-]+:[a-z0-9-]*:(\d{12}):")
# Not after "=": a pinned four-part version (pkg==5.0.0.93) is not an address.
IPV4 = re.compile(r"(?<![\w.=])(\d{1,3}(?:\.\d{1,3}){3})(?![\w.])")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / n for n in names.splitlines() if Path(n).suffix.lower() not in BINARY and (REPO / n).is_file()]


def test_no_credentials_account_ids_or_foreign_addresses_are_committed() -> None:
    files = tracked_text_files()
    assert len(files) > 50
    problems = []
    for path in files:
        text = path.read_text(errors="replace")
        where = path.relative_to(REPO)
        problems += [f"{where}: access key id" for _ in ACCESS_KEY.finditer(text)]
        problems += [f"{where}: secret access key" for _ in SECRET.finditer(text)]
        problems += [f"{where}: account {m[1]}" for m in ACCOUNT_ARN.finditer(text) if m[1] != PLACEHOLDER_ACCOUNT]
        for match in IPV4.finditer(text):
            try:
                address = ipaddress.ip_address(match[1])
            except ValueError:
                continue  # not an address (a four-part version number)
            if not (address.is_loopback or address.is_unspecified):
                problems.append(f"{where}: address {address}")
    assert problems == []


def test_the_scan_would_see_a_leak() -> None:
    # Assembled here, so that this file itself holds no such string.
    leaked = (
        "key AKIA" + "ABCDEFGHIJKLMNOP, arn:aws:iam::" + "210987654321:role/x, host " + ".".join(["10", "1", "2", "3"])
    )
    assert ACCESS_KEY.search(leaked) and ACCOUNT_ARN.search(leaked)
    assert ipaddress.ip_address(IPV4.findall(leaked)[0]).is_private
