"""Make what an encrypted, authenticated Flower deployment needs: a CA, the SuperLink's TLS certificate,
and one SuperNode key pair per node.

Writes into ``--out`` (refusing to overwrite unless ``--force``):

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (keep ``ca.key`` off the machines);
  every SuperNode and the ``flwr`` CLI verify the SuperLink with ``ca.crt``
  (``--root-certificates``, ``root-certificates`` in the Flower configuration file);
* ``server.pem`` / ``server.key``: the SuperLink's certificate for ``--host`` names and addresses
  (default ``127.0.0.1`` and ``localhost``; add the SuperLink's public name or IP), for
  ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``;
* ``supernode-<i>`` / ``supernode-<i>.pub``: an EC P-384 key pair in OpenSSH format per SuperNode.
  With ``flower-superlink --enable-supernode-auth`` only SuperNodes whose public key was registered
  (``flwr supernode register supernode-<i>.pub <connection>``) may connect; each node starts with
  ``--auth-supernode-private-key supernode-<i>``.

Private keys are written with mode 0600. Uses ``cryptography`` (a dependency of flwr).

    python scripts/make_deployment_keys.py --out keys --supernodes 2 [--host superlink.example.org] [--days 365]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_keys(out: Path, hosts: Sequence[str], supernodes: int, days: int = 365, force: bool = False) -> list[Path]:
    """Write the CA, the SuperLink's certificate and ``supernodes`` SuperNode key pairs; the written paths."""
    names = ["ca.crt", "ca.key", "server.pem", "server.key"]
    names += [f"supernode-{i}{ext}" for i in range(supernodes) for ext in ("", ".pub")]
    out.mkdir(parents=True, exist_ok=True)
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise FileExistsError(f"{out} already holds {existing}; pass --force to replace them (nodes and the "
                              "SuperLink using the old ones stop working)")
    now = datetime.datetime.now(datetime.UTC)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5),
             "not_valid_after": now + datetime.timedelta(days=days)}
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hilora-lightning deployment CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(valid["not_valid_before"])
          .not_valid_after(valid["not_valid_after"])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
              .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "server.pem", server.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(server_key), private=True)
    for i in range(supernodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        _write(out / f"supernode-{i}", private, private=True)
        _write(out / f"supernode-{i}.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                         serialization.PublicFormat.OpenSSH)
               + f" hilora-supernode-{i}\n".encode())
    return [out / n for n in names]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the keys and certificates")
    parser.add_argument("--host", action="append", default=None,
                        help="a name or IP the SuperLink is reached at (repeatable; default 127.0.0.1, localhost)")
    parser.add_argument("--supernodes", type=int, default=2, help="SuperNode key pairs to make (default 2)")
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates in days")
    parser.add_argument("--force", action="store_true", help="replace keys already in --out")
    args = parser.parse_args(argv)
    if args.supernodes < 0 or args.days < 1:
        parser.error(f"--supernodes must be >= 0 and --days >= 1, got {args.supernodes} and {args.days}")
    try:
        paths = make_keys(args.out, args.host or ["127.0.0.1", "localhost"], args.supernodes, args.days, args.force)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
