"""Development certificates for a secured Flower deployment (``fedkd certs``).

One folder holds everything a loopback or lab deployment needs:

- ``ca.crt`` / ``ca.key``: a self-signed development certificate authority;
- ``server.crt`` / ``server.key``: the SuperLink's TLS certificate, signed by that CA, with one
  subject alternative name per host the SuperNodes and the ``flwr`` CLI dial;
- ``supernode-<i>.key`` / ``supernode-<i>.pub``: SuperNode authentication key pairs in the
  format Flower 1.41 reads: an ECDSA key on a NIST curve, the private key in OpenSSH format
  (``flower-supernode --auth-supernode-private-key``), the public key as an OpenSSH line
  (``flwr supernode register``);
- ``DEV-ONLY.txt``: what each file is for, and why none of it belongs in production.

Everything is made with the ``cryptography`` package (which Flower itself uses); nothing is
hand-rolled and nothing shells out to openssl.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Always in the SuperLink certificate: the SuperLink's own SuperExec and ServerApps dial its
# Runtime API on loopback (Flower turns a --host of 0.0.0.0 into 127.0.0.1), over the same TLS.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
# P-384 is the curve Flower's own SuperNode key helpers use; TLS stacks accept it everywhere.
CURVE = ec.SECP384R1
# Certificates start a little in the past so that small clock skews between sites do not make
# a fresh certificate "not yet valid".
CLOCK_SKEW = datetime.timedelta(minutes=5)
_HOSTNAME = re.compile(r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")


class CertificateError(ValueError):
    """Bad arguments for the development certificates; the message says what to change."""


@dataclass(frozen=True)
class DevCertificates:
    """Paths of the files :func:`create_dev_certificates` wrote.

    Attributes
    ----------
    dir : Path
        The folder holding them all.
    ca_cert, ca_key : Path
        The development CA certificate (give it to every SuperNode and to the ``flwr`` CLI as
        the root certificate) and its private key.
    server_cert, server_key : Path
        The SuperLink's TLS certificate and private key.
    node_keys : list of tuple of Path
        ``(private key, public key)`` per SuperNode, in node order.
    readme : Path
        ``DEV-ONLY.txt``.
    """

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    readme: Path
    node_keys: list[tuple[Path, Path]] = field(default_factory=list)


def _san(host: str) -> x509.GeneralName:
    """One subject alternative name: an IP address, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        raise CertificateError(
            f"--host: {host!r} is neither an IP address nor a host name; give one host per "
            "--host, without scheme or port (e.g. --host 10.0.0.5 --host superlink.lab)"
        )
    return x509.DNSName(host)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedkd development (not for production)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write `data`; private keys are created readable by their owner only."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
    days: int,
) -> x509.CertificateBuilder:
    """A certificate for `key`, valid from a little before `now` (clock skew) for `days`."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    """Signing for every key; certificate and CRL signing for the CA's, ECDH key agreement
    (TLS with an EC key) for the others'."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _ca(now: datetime.datetime, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    name = _name("fedkd development CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _builder(name, name, key, now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _server(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    now: datetime.datetime,
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    cert = (
        _builder(_name(hosts[0]), ca_cert.subject, key, now, days)
        # TLS clients match the host they dial against the SANs, never the common name.
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _node_key_pair(index: int) -> tuple[bytes, bytes]:
    """An OpenSSH private key and its OpenSSH public line (with a comment naming the node)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" fedkd-supernode-{index}\n".encode()


def _readme(certs: DevCertificates, hosts: Sequence[str], days: int) -> str:
    nodes = "\n".join(
        f"  {priv.name:<18} {pub.name:<18} SuperNode {i}"
        for i, (priv, pub) in enumerate(certs.node_keys)
    )
    return f"""\
DEVELOPMENT ONLY - do not use these files to protect real data.

Made by `fedkd certs` for trying a secured Flower deployment (TLS and SuperNode
authentication) on one machine or in a lab. Every private key here was generated on one
machine, is unencrypted, and the CA key that can issue more certificates lies next to them.
In production, use your organisation's PKI for the SuperLink certificate, and let each site
generate its own SuperNode key pair so that its private key never leaves the site.

Valid for {days} days. The SuperLink certificate is valid for: {", ".join(hosts)}
(SuperNodes and the flwr CLI must dial one of these names; re-run with --host to add others;
127.0.0.1 and localhost are always there: the SuperLink's own ServerApps dial those).

  ca.crt             development CA certificate: every SuperNode (--root-certificates) and
                     the flwr CLI connection (root-certificates = ...) trust it
  ca.key             the CA's private key: keep it away from everything else
  server.crt         SuperLink TLS certificate (--ssl-certfile), signed by ca.crt
  server.key         its private key (--ssl-keyfile); the SuperLink also takes
                     --ssl-ca-certfile ca.crt

SuperNode authentication (ECDSA P-384; private keys in OpenSSH format, public keys as one
OpenSSH line). Give site i its private key; register its public key on the SuperLink with
`flwr supernode register supernode-<i>.pub <connection>` before the SuperNode starts:

{nodes}
"""


def create_dev_certificates(
    out_dir: str | Path,
    nodes: int = 3,
    hosts: Sequence[str] = (),
    days: int = 365,
    force: bool = False,
) -> DevCertificates:
    """Write a development CA, a SuperLink TLS certificate and SuperNode key pairs.

    Parameters
    ----------
    out_dir : str or Path
        Folder to write into (created if missing).
    nodes : int, optional
        Number of SuperNode authentication key pairs.
    hosts : sequence of str, optional
        Host names and IP addresses the SuperNodes and the ``flwr`` CLI dial the SuperLink at
        (the certificate's subject alternative names; the first is also its common name).
        127.0.0.1 and localhost are always added: the SuperLink's own processes dial those.
    days : int, optional
        Validity of the certificates in days.
    force : bool, optional
        Replace files a previous call wrote; without it, existing files stop the call.

    Returns
    -------
    DevCertificates
        The paths written.

    Raises
    ------
    CertificateError
        If an argument is out of range, a host is malformed, or files exist and not `force`.
    RunDirError
        If the folder cannot be created.
    """
    given = [h.strip() for h in hosts]
    if not all(given):
        raise CertificateError("--host: empty host name; give a host name or an IP address")
    hosts = list(dict.fromkeys([*given, *LOOPBACK_HOSTS]))
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise CertificateError(
            f"--nodes: expected a positive integer (one key pair per SuperNode), got {nodes!r}"
        )
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise CertificateError(f"--days: expected a positive integer, got {days!r}")
    for host in hosts:  # validate every host before writing anything
        _san(host)

    folder = Path(out_dir).expanduser()
    certs = DevCertificates(
        dir=folder,
        ca_cert=folder / "ca.crt",
        ca_key=folder / "ca.key",
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
        readme=folder / "DEV-ONLY.txt",
        node_keys=[
            (folder / f"supernode-{i}.key", folder / f"supernode-{i}.pub") for i in range(nodes)
        ],
    )
    paths = [certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key, certs.readme]
    paths += [p for pair in certs.node_keys for p in pair]
    existing = [p.name for p in paths if p.exists()]
    if existing and not force:
        raise CertificateError(
            f"{folder} already holds {', '.join(existing[:4])}"
            f"{'...' if len(existing) > 4 else ''}; pass --force to replace them, or choose "
            "another folder"
        )
    from fedkd.results import make_folder

    make_folder(folder, "certificate folder")

    now = datetime.datetime.now(datetime.UTC)
    ca_key, ca_cert = _ca(now, days)
    server_key, server_cert = _server(ca_key, ca_cert, hosts, now, days)
    _write(certs.ca_key, _pem_key(ca_key), private=True)
    _write(certs.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(certs.server_key, _pem_key(server_key), private=True)
    _write(certs.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    for i, (private_path, public_path) in enumerate(certs.node_keys):
        private, public = _node_key_pair(i)
        _write(private_path, private, private=True)
        _write(public_path, public)
    _write(certs.readme, _readme(certs, hosts, days).encode())
    return certs
