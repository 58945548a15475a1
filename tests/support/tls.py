"""A private certificate authority made by the test with the openssl command line: server certificates
for the test's Redis and RabbitMQ TLS listeners and client certificates for the worker. Nothing here is
trusted by the machine; a worker trusts a CA only through the SSL_CERT_FILE the test gives it."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_DAYS = "2"
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} -> {done.returncode}\n{done.stderr}")


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PrivateCA:
    name: str
    dir: Path
    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path, name: str) -> PrivateCA:
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        _openssl(
            "req", "-x509", *_KEY, "-keyout", str(key), "-out", str(cert), "-days", _DAYS,
            "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash",
            cwd=directory,
        )  # fmt: skip
        return cls(name, directory, cert, key)

    def issue(self, name: str, *, dns: tuple[str, ...] = (), client: bool = False) -> Certificate:
        """A leaf certificate signed by this CA: a server's for the DNS names `dns`, or a client's."""
        cert, key, csr = (self.dir / f"{name}.{ext}" for ext in ("pem", "key", "csr"))
        extensions = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature",
            f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}",
            "subjectKeyIdentifier=hash",
            "authorityKeyIdentifier=keyid",
        ]
        if dns:
            extensions.append("subjectAltName=" + ",".join(f"DNS:{d}" for d in dns))
        ext_file = self.dir / f"{name}.ext"
        ext_file.write_text("\n".join(extensions) + "\n")
        _openssl("req", *_KEY, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=self.dir)
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-days", _DAYS, "-out", str(cert), "-extfile", str(ext_file),
            cwd=self.dir,
        )  # fmt: skip
        key.chmod(0o600)
        return Certificate(cert, key)


@dataclass(frozen=True)
class ServerTLS:
    """What a TLS listener of the test's services presents and whom it asks for a certificate."""

    ca: Path
    cert: Path
    key: Path
    require_client_cert: bool = False
