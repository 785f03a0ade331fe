"""Test certificates, made in-test with the openssl command line (a throwaway CA, a server
certificate for 127.0.0.1/localhost and a client certificate), as docs/deploy.md shows."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")  # fast to make


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _signed(name: str, subject: str, ext: str, d: Path) -> None:
    _run("req", *EC_KEY, "-keyout", f"{name}.key", "-subj", subject, "-out", f"{name}.csr",
         cwd=d)
    (d / f"{name}.ext").write_text(ext)
    _run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "1", "-sha256", "-extfile", f"{name}.ext",
         "-out", f"{name}.pem", cwd=d)


def make_certs(d: Path) -> Certs:
    d.mkdir(parents=True, exist_ok=True)
    _run("req", "-x509", *EC_KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
         "-subj", "/CN=hsplitlora test CA", cwd=d)
    _signed("server", "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n", d)
    _signed("client", "/CN=client-0", "extendedKeyUsage=clientAuth\n", d)
    return Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
                 d / "client.key")
